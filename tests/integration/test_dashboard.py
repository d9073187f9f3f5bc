"""The dashboard in a real browser (Debian's chromium driven by Playwright), and the monitoring stack's metric
names, against one real network: a coordinator process, two miner processes and a validator process on
127.0.0.1, the coordinator sharing its evaluation with the validator ([validation] assign)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gradpool.processes import Processes
from protocol.signing import generate_key, public_key_hex, save_key
from tests.helpers.required import required
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow  # a real network of miners, and a browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTEFACTS = Path(os.environ.get("GRADPOOL_TEST_ARTEFACTS", ROOT / "runs" / "test-artefacts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Network:
    def __init__(self, url: str, miner_metrics: str, procs: Processes, validator: str) -> None:
        self.url, self.miner_metrics, self.procs, self.validator = url, miner_metrics, procs, validator

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = httpx.get(f"{self.url}/v1/status", timeout=10).json()
        return status

    def wait_rounds(self, n: int, timeout_s: float = 150) -> dict[str, Any]:
        def closed() -> dict[str, Any] | None:
            status = self.status()
            assert not self.procs.dead(), f"a process exited: {self.procs.dead()}"
            return status if len(status["rounds"]) >= n else None

        return wait_until(closed, timeout_s, f"{n} rounds to close", interval_s=0.3)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Iterator[Network]:
    root = tmp_path_factory.mktemp("dashboard")
    key = generate_key()
    save_key(key, root / "v.pem")
    validator = public_key_hex(key)
    procs = Processes(root / "logs", env={"GRADPOOL_STARTUP_TIMEOUT_S": "60"})
    env = {
        "GRADPOOL_ROUNDS__MIN_QUORUM": "2",
        "GRADPOOL_ROUNDS__DEADLINE_S": "60",
        "GRADPOOL_DATA__EVAL_EVERY": "20",
        "GRADPOOL_DATA__EVAL_SEQUENCES": "16",
        "GRADPOOL_RECIPE__INNER_STEPS": "4",
        "GRADPOOL_RECIPE__BATCH_SIZE": "4",
        "GRADPOOL_VALIDATION__OWN_SEQUENCES": "16",
        "GRADPOOL_VALIDATION__OTHER_SEQUENCES": "32",
        "GRADPOOL_VALIDATION__ASSIGN": "true",  # one validator, trusted alone: the coordinator evaluates none
        "GRADPOOL_VALIDATION__REDUNDANCY": "1",
        "GRADPOOL_VALIDATION__VALIDATORS": json.dumps([validator]),
    }
    args = ["--state-dir", str(root / "coordinator"), "--corpus", str(corpus_file), "--port", "0"]
    try:
        url = procs.start_coordinator(args, root / "ready.json", env=env)
        port = _free_port()
        for i in range(2):
            extra = ["--metrics-port", str(port)] if i == 0 else []
            procs.start(
                f"miner-{i}",
                [
                    "mine",
                    "--coordinator",
                    url,
                    "--key",
                    str(root / f"m{i}.pem"),
                    "--create-key",
                    "--state-dir",
                    str(root / f"miner-{i}"),
                    "--threads",
                    "1",
                    *extra,
                ],
            )
        state = str(root / "validator")
        validate = ["validate", "--coordinator", url, "--key", str(root / "v.pem"), "--threads", "1"]
        procs.start("validator", [*validate, "--state-dir", state])
        yield Network(url, f"http://127.0.0.1:{port}/metrics", procs, validator)
    finally:
        procs.stop_all()


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A page of Debian's chromium (never a downloaded browser), driven by Playwright for this test alone:
    its event loop stops with the test, so the tests after it in this process may run their own."""
    chromium = required(CHROMIUM, "Debian's chromium", "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_the_dashboard_shows_the_network_live(network: Network, browser_page: Any) -> None:
    page = browser_page
    page.set_viewport_size({"width": 390, "height": 844})  # a phone's width
    page.goto(network.url + "/")
    page.wait_for_function("() => document.getElementById('round-number').textContent !== '\u2013'")
    first_round = int(page.text_content("#round-number") or "-1")

    network.wait_rounds(2)
    # No reload: the page's own polling brings the new rounds in.
    advanced = f"() => Number(document.getElementById('round-number').textContent) > {first_round}"
    page.wait_for_function(advanced, timeout=30_000)
    page.wait_for_function(
        "() => document.querySelectorAll('#loss-chart circle.pt').length >= 2", timeout=30_000
    )
    page.wait_for_function("() => document.querySelectorAll('#leaderboard tr').length >= 2", timeout=30_000)
    page.wait_for_function("() => document.querySelectorAll('#rounds tr').length >= 2", timeout=30_000)

    status = network.status()
    shown = {page.get_attribute(f"#leaderboard tr:nth-child({i}) code", "title") for i in (1, 2)}
    assert shown == {m["miner"] for m in status["leaderboard"]} and len(shown) == 2
    assert page.locator("#bytes-chart circle.pt").count() >= 4  # up and down, two rounds
    # the real miners' training health: two gradient norms per round (the clipped fraction may be 0)
    assert page.locator("#health-chart path.gmean").count() == 1
    assert page.locator("#health-chart circle.pt").count() >= 4
    assert re.fullmatch(r"\d+ / \d+", page.text_content("#round-uploads") or "")
    assert "tiny" in (page.text_content("#config") or "")
    # the validator's record: the uploads it was assigned, its verdicts standing
    page.wait_for_function("() => document.querySelectorAll('#validators tr code').length === 1")
    assert page.get_attribute("#validators tr code", "title") == network.validator
    page.wait_for_function(
        "() => Number(document.querySelector('#validators tr td:nth-child(3)').textContent) > 0"
    )
    # Nothing overflows a phone-width screen but the tables, which scroll in their own box.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "dashboard-phone.png"), full_page=True)


def _exported(text: str) -> set[str]:
    """Every sample name, and each declared family's (a labelled counter has no sample before its first
    increment, yet it is exported)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names |= {name} | (
                {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set()
            )
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def _referred(expr: str) -> set[str]:
    return set(re.findall(r"\bgradpool_[a-z_]+\b", expr))


def test_every_metric_the_monitoring_stack_uses_is_exported(network: Network) -> None:
    network.wait_rounds(1)
    exported = _exported(httpx.get(f"{network.url}/metrics", timeout=10).text)
    exported |= _exported(httpx.get(network.miner_metrics, timeout=10).text)
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "gradpool.json").read_text())
    used = {m for panel in board["panels"] for t in panel.get("targets", []) for m in _referred(t["expr"])}
    for name in ("prometheus.yml", "alerts.yml"):
        used |= _referred(json.dumps(yaml.safe_load((ROOT / "deploy" / "prometheus" / name).read_text())))
    assert len(used) >= 10
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    assert all(m.startswith("gradpool_") for m in exported if not m.startswith(("python_", "process_")))
