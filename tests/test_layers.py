"""The package's layers import one way: spec <- kernels, placement, transport <- model <- worker, coordinator
<- the commands on top. The planner and the spec layer never import torch."""

import ast
import subprocess
import sys
from pathlib import Path

from test_placement_support import EXAMPLES, REAL_CONFIG, REPO

PACKAGE = REPO / "moemesh"
# What each layer may import from moemesh (besides itself and the root package's version).
ALLOWED = {
    "spec": set(),
    "kernels": {"spec"},
    "placement": {"spec"},
    "transport": {"spec"},
    "model": {"spec", "kernels"},
    "train": {"spec", "kernels"},
    "worker": {"spec", "kernels", "model", "transport", "process"},
    "coordinator": {"spec", "kernels", "model", "transport", "placement", "process"},
    "process": set(),
    "api": {"spec", "kernels", "model", "transport", "worker", "coordinator", "process"},  # HTTP on top of both
}
THIRD_PARTY_FORBIDDEN = {"spec": {"torch", "numpy", "mlx", "grpc"}, "placement": {"torch", "mlx", "grpc"}}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in one file of the package."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            if node.module is None:  # `from . import x`: each x is a module of that package
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _layer(module: str) -> str | None:
    """The layer a module belongs to (None outside the package and for the root's `__version__`); the root's
    own modules and each lifecycle's `cli.py` are the commands on top, which may import any layer."""
    parts = module.split(".")
    if parts[0] != "moemesh" or len(parts) < 2 or parts[1] in ("__version__", "__init__"):
        return None
    if parts[-1] in ("cli", "__main__") or (len(parts) == 2 and parts[1] not in ALLOWED and not (PACKAGE / parts[1]).is_dir()):
        return "commands"
    return parts[1]


def test_layers_import_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(".".join(path.relative_to(REPO).with_suffix("").parts))
        if own not in ALLOWED:
            continue  # the commands on top import any layer
        for line, name in _imports(path):
            target = _layer(name)
            if name.split(".")[0] in THIRD_PARTY_FORBIDDEN.get(own, ()):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name} (layer '{own}' stays free of it)")
            if target is not None and target != own and target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name} ('{own}' may import only "
                             f"{sorted(ALLOWED[own]) or 'nothing else'})")
    assert not wrong, "\n".join(wrong)


def test_the_walker_sees_relative_imports(tmp_path):
    # The check above is only as good as its resolution of `from ..x import y`.
    found = dict((name, line) for line, name in _imports(PACKAGE / "kernels" / "fp8.py"))
    assert "moemesh.spec.formats" in found and "moemesh.kernels.formats" in found


def test_placement_plans_the_real_model_without_torch(tmp_path):
    runner = ("import sys\nfrom moemesh.placement.cli import app\nsys.argv = ['placement'] + sys.argv[1:]\n"
              "try:\n    app()\nexcept SystemExit as e:\n    code = e.code or 0\n"
              "print('TORCH IMPORTED' if 'torch' in sys.modules else 'no torch')\nsys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", runner, "plan", "--model", str(REAL_CONFIG), "--cluster",
                        str(EXAMPLES / "mac-mini-m4pro-x8.yaml"), "--quant", "int4", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("no torch"), r.stdout[-500:]
    assert (tmp_path / "p.json").exists()
