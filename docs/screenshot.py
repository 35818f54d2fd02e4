"""Rebuild the README's screenshot: the demo after the autopilot's clicks as an archetype, then Generate.

    PYTHONPATH=. python docs/screenshot.py [--bundle DIR] [--who "busy executive"] [--out docs/demo.png]

Serves the real app in this process and drives Debian's chromium through Playwright (as the
browser test does). Greedy decoding, so the same bundle gives the same answers.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a persona bundle folder (default: the app's default)")
    ap.add_argument("--who", default="busy executive", help="the autopilot's archetype")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo.png")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 2
    import torch
    from playwright.sync_api import sync_playwright

    from demo.handlers import DemoApp
    from demo.ui import build, configure_queue

    torch.set_num_threads(1)
    app = DemoApp(args.bundle)
    if args.who not in app.bundle.archetypes:
        print(f"error: --who must be one of {', '.join(app.bundle.archetypes)}, got {args.who!r}", file=sys.stderr)
        return 2
    demo = configure_queue(build(app))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#map .js-plotly-plot", timeout=60_000)
            page.get_by_text("Autopilot: watch a simulated user click").click()
            page.wait_for_selector("#autopilot-who input", timeout=30_000)
            page.fill("#autopilot-who input", args.who)
            page.keyboard.press("Enter")
            page.click("#btn-autopilot")
            page.wait_for_function("document.querySelector('#status').innerText.includes('10 clicks')", timeout=120_000)
            page.get_by_text("Autopilot: watch a simulated user click").click()  # closed again, as on a fresh page
            page.click("#btn-generate")
            for sel in ("#steered", "#baseline"):
                page.wait_for_function(f"document.querySelector('{sel}').innerText.trim().length > 3", timeout=300_000)
            page.wait_for_timeout(1500)  # the meters under the answers draw after the last token
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
