"""The torch-free layer every other part stands on: config parsing (`ModelArgs`), tensor names and shapes,
the weight formats' constants and their bytes, routing statistics, and units people type.

Numbers and shapes only: nothing here imports torch, numpy-heavy code or another moemesh package, so the
placement planner runs from this layer alone (tests/test_layers.py holds every package to its layer).
"""
