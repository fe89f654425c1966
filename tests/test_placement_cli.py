"""The `placement` CLI on the real DeepSeek-V3 config and the shipped example clusters."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from test_placement_support import EXAMPLES, REAL_CONFIG, REPO

# Runs the CLI in a fresh interpreter, then reports whether anything imported torch.
RUNNER = """
import sys
from moemesh.placement.cli import app
sys.argv = ["placement"] + sys.argv[1:]
try:
    app()
except SystemExit as e:
    code = e.code or 0
print("TORCH IMPORTED" if "torch" in sys.modules else "no torch")
sys.exit(code)
"""


def cli(*args, cwd):
    r = subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    return r


def test_plan_on_the_exo_cluster_prints_the_reference_and_writes_outputs(tmp_path):
    r = cli("plan", "--model", REAL_CONFIG, "--cluster", EXAMPLES / "mac-mini-m4pro-x8.yaml", "--quant", "int4",
                     "--no-mtp", "--out", tmp_path / "plan.json", "--svg", tmp_path / "plan.svg", "--measured", "5.37",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("no torch")
    out = r.stdout
    assert "5.37 tokens/s" in out and "2.91 s to first token" in out and "this plan predicts" in out
    assert "mini-8" in out and "memory-proportional (exo)" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["format"] == "moemesh.plan/1" and saved["tokens_per_s"] > 0
    assert ET.parse(tmp_path / "plan.svg").getroot().tag.endswith("svg")


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_compare_runs_on_every_example(tmp_path, example):
    r = cli("compare", "--model", REAL_CONFIG, "--cluster", EXAMPLES / example, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("equal split (mlx-lm)", "memory-proportional (exo)", "EPLB", "moemesh plan"):
        assert name in r.stdout
    assert r.stdout.strip().endswith("no torch")


def test_three_minis_cannot_hold_deepseek_v3_and_say_by_how_much(tmp_path):
    r = cli("plan", "--model", REAL_CONFIG, "--cluster", EXAMPLES / "mac-mini-m4pro-x3.yaml", cwd=tmp_path)
    assert r.returncode == 1
    assert "short by" in r.stdout and "mini-1" in r.stdout and "GB" in r.stdout
    assert not (tmp_path / "plan.json").exists()


def test_bad_cluster_file_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - {name: a, memory: 16 GB, bandwidth: fast, compute: 1 TFLOPS}\n"
                   "links: {default: {rtt: 1 ms, bandwidth: 1 Gbit/s}}\n")
    r = cli("plan", "--model", REAL_CONFIG, "--cluster", bad, cwd=tmp_path)
    assert r.returncode == 1 and "bad.yaml" in r.stdout and "'bandwidth'" in r.stdout
