"""Drive the status page in headless chromium and report what its DOM shows, as JSON lines.

Run as a subprocess by tests/test_status_browser.py: playwright's sync API runs its own event
loop on greenlets and does not belong in the gevent-patched pytest process. No playwright
browser download is used: it drives Debian's chromium (`--chromium`).

    python tests/browser_check.py --url http://127.0.0.1:PORT/ --platforms a,b --target a \
        --out DIR [--timeout 15]

Steps, one JSON line on stdout each (the test reads them as they come):
    {"event": "ready", ...}      every platform's card is up (green) and shows "ready"
    {"event": "down", ...}       the target's card turned down (red); the test injects the drop
                                 after reading "ready", so `waited_s` is the page's reaction time
    {"event": "recovered", ...}  the target's card is up again (the test ends the outage after
                                 reading "down")
    {"event": "error", "message"} on any failure (then exit 1)
Screenshots: DIR/status-ready.png, DIR/status-down.png, DIR/status-recovered.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def cards(page) -> list[dict]:
    return page.eval_on_selector_all(
        ".card[data-platform]",
        "els => els.map(e => ({platform: e.dataset.platform, state: e.dataset.state,"
        " classes: e.className, text: e.querySelector('.state').textContent}))")


def card(platform: str, cls: str) -> str:
    return f'.card.{cls}[data-platform="{platform}"]'


def run(args) -> None:
    from playwright.sync_api import sync_playwright

    platforms = [p for p in args.platforms.split(",") if p]
    timeout_ms = args.timeout * 1000
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}")
                    if m.type == "error" else None)
            page.goto(args.url, wait_until="domcontentloaded", timeout=timeout_ms)
            page.wait_for_selector("#link.live", timeout=timeout_ms)
            for name in platforms:
                page.wait_for_selector(card(name, "up"), timeout=timeout_ms)
            page.screenshot(path=f"{args.out}/status-ready.png", full_page=True)
            emit("ready", cards=cards(page), overall=page.text_content("#overall"),
                 problems=problems)

            started = time.monotonic()
            page.wait_for_selector(card(args.target, "down"), timeout=timeout_ms)
            waited = time.monotonic() - started
            # let the snapshot that shows the outage settle in, with its error line
            page.wait_for_selector(card(args.target, "down") + " .error", timeout=timeout_ms)
            page.screenshot(path=f"{args.out}/status-down.png", full_page=True)
            emit("down", waited_s=round(waited, 2), cards=cards(page),
                 overall=page.text_content("#overall"), problems=problems)

            started = time.monotonic()
            page.wait_for_selector(card(args.target, "up"), timeout=timeout_ms)
            page.screenshot(path=f"{args.out}/status-recovered.png", full_page=True)
            emit("recovered", waited_s=round(time.monotonic() - started, 2), cards=cards(page),
                 overall=page.text_content("#overall"), problems=problems)
        finally:
            browser.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--platforms", required=True, help="comma-separated platform names")
    p.add_argument("--target", required=True, help="the platform whose card must turn red")
    p.add_argument("--out", required=True, help="directory for the screenshots")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per step")
    args = p.parse_args()
    try:
        run(args)
    except Exception as e:  # reported to the test as data, not as a traceback to parse
        emit("error", message=f"{type(e).__name__}: {e}"[:2000])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
