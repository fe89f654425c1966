"""Placement planner: which node holds which layers and experts, and how fast that decodes.

Pure Python + numpy; never imports torch. See docs/placement.md.
"""

from .cluster import Cluster, ClusterError, Link, Node, Reference, load_cluster
from .plan import Plan
from .planner import PlacementError, plan
from ..spec.sizes import WeightFormat, model_sizes, weight_format

__all__ = ["Cluster", "ClusterError", "Link", "Node", "Plan", "PlacementError", "Reference", "WeightFormat",
           "load_cluster", "model_sizes", "plan", "weight_format"]
