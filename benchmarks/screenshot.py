"""A screenshot of the dashboard over a finished ``gradpool simulate`` run (README's picture).

The run's coordinator is started again on its state directory (no miner joins, so nothing changes) and
Debian's chromium, driven by Playwright, photographs ``/`` at a phone's width.

    gradpool simulate --miners 3 --rounds 12 --out runs/demo
    python -m benchmarks.screenshot --run runs/demo --out benchmarks/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from gradpool.processes import Processes

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.screenshot", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a gradpool simulate --out folder")
    p.add_argument("--out", type=Path, default=Path("benchmarks/dashboard.png"))
    p.add_argument("--width", type=int, default=420)
    args = p.parse_args(argv)
    chromium = shutil.which("chromium")
    config = args.run / "coordinator.toml"
    if chromium is None or not config.is_file():
        print(f"error: needs chromium on PATH and a finished simulate run at {args.run}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    procs = Processes(args.run / "logs" / "screenshot")
    try:
        url = procs.start_coordinator(["--config", str(config), "--port", "0"], args.run / "screenshot.ready")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_function("() => document.querySelectorAll('#leaderboard tr code').length > 0")
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        procs.stop_all()
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
