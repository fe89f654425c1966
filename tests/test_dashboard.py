"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a running 3-worker
cluster: it shows the three nodes, a chat message streams an answer, the expert heatmap has cells, and the
page is kept as a screenshot (tmp_path/dashboard.png)."""

import json
from pathlib import Path

import pytest
from test_api import tiny_config

from moemesh.demo import write_random_checkpoint
from moemesh.launch import LocalCluster, free_port

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian: apt-get install chromium)")


def test_dashboard_shows_the_cluster_and_streams_a_chat(tmp_path):
    path = write_random_checkpoint(tmp_path / "tiny-v3", tiny_config(), seed=1)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    port = free_port()
    cluster = LocalCluster(path, 3, tmp_path, ["--split", "even+experts", "--dtype", "float32", "--api-port",
                                               str(port)])
    try:
        cluster.wait_ready(nodes=3).close()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_function("document.querySelectorAll('.node[data-node]').length === 3", timeout=30_000)
                assert sorted(page.eval_on_selector_all(".node[data-node]", "ns => ns.map(n => n.dataset.node)")) == [
                    "w1", "w2", "w3"]
                assert page.text_content("#state") == "ready"

                page.fill("#prompt", "Hello, who are you?")
                page.press("#prompt", "Enter")
                page.wait_for_function("document.querySelector('#chatstats').textContent.includes('tokens')",
                                       timeout=60_000)
                answer = page.text_content(".msg.assistant")
                assert answer and not page.query_selector(".msg.error")

                # The chat's tokens were routed: the next snapshot fills the heatmap (3 MoE layers x 8 experts).
                page.wait_for_function("document.querySelectorAll('#heatmap .cell[title]').length === 24",
                                       timeout=30_000)
                assert "tokens" in page.get_attribute("#heatmap .cell", "title")
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            finally:
                browser.close()
    finally:
        cluster.close()
