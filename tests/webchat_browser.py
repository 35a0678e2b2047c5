"""Drive the web chat page in headless chromium, one command per stdin line, one JSON event per
stdout line (run as a subprocess by tests/test_webchat_browser.py: playwright's sync API runs
its own loop and does not belong in the gevent-patched pytest process). Debian's chromium is
driven directly (`--chromium`); no playwright browser download is used.

    python tests/webchat_browser.py --url http://127.0.0.1:PORT/chat --out DIR [--timeout 20]

Commands (-> event):
    open                   load the page, wait until its socket is live       -> opened
    send TEXT              type TEXT, press Enter                             -> sent {id}
    streaming ID           wait until the answer to ID streams in             -> streaming {text}
    reply ID               wait until the answer to ID is final               -> reply {text, ...}
    down / live            wait until the page shows its socket lost / live   -> down / live
    leave / return         navigate away (the tab is gone) / load it again   -> left / returned
    shot NAME              screenshot DIR/NAME.png                            -> shot
    quit                                                                      -> bye
Every event carries `problems`: page errors, CSP violations and console errors other than the
browser's own "WebSocket connection ... failed" lines (expected while the gateway restarts).
On any failure: {"event": "error", "message"} and exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
EXPECTED_CONSOLE = ("WebSocket connection to", "Failed to load resource")


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def bot(reply_to: str, state: str = "") -> str:
    return f'.msg.bot{"." + state if state else ""}[data-reply-to="{reply_to}"]'


def run(args) -> None:
    from playwright.sync_api import sync_playwright

    timeout_ms = args.timeout * 1000
    problems: list[str] = []

    def on_console(msg) -> None:
        if msg.type == "error" and not msg.text.startswith(EXPECTED_CONSOLE):
            problems.append(f"console.error: {msg.text}")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 760})
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("console", on_console)

            def live() -> None:
                page.wait_for_selector("#link.live", timeout=timeout_ms)

            for line in sys.stdin:
                command, _, arg = line.strip().partition(" ")
                if command == "open" or command == "return":
                    page.goto(args.url, wait_until="domcontentloaded", timeout=timeout_ms)
                    live()
                    emit("opened" if command == "open" else "returned", problems=problems,
                         bubbles=page.locator(".msg").count())
                elif command == "send":
                    before = page.locator(".msg.user").count()
                    page.fill("#text", arg)
                    page.press("#text", "Enter")
                    page.wait_for_function(f"document.querySelectorAll('.msg.user').length > "
                                           f"{before}", timeout=timeout_ms)
                    mid = page.locator(".msg.user").last.get_attribute("data-id")
                    emit("sent", id=mid, problems=problems)
                elif command == "streaming":
                    el = page.wait_for_selector(bot(arg, "streaming"), timeout=timeout_ms)
                    emit("streaming", text=el.text_content(), problems=problems)
                elif command == "reply":
                    el = page.wait_for_selector(bot(arg, "final"), timeout=timeout_ms)
                    emit("reply", text=el.text_content(), problems=problems,
                         bots=page.locator(f'.msg.bot[data-reply-to="{arg}"]').count(),
                         users=page.locator(f'.msg.user[data-id="{arg}"]').count(),
                         user_state=page.get_attribute(f'.msg.user[data-id="{arg}"]',
                                                       "data-state"))
                elif command == "down":
                    page.wait_for_selector("#link.down", timeout=timeout_ms)
                    emit("down", problems=problems)
                elif command == "live":
                    live()
                    emit("live", problems=problems)
                elif command == "leave":
                    page.goto("about:blank")
                    emit("left", problems=problems)
                elif command == "shot":
                    page.screenshot(path=f"{args.out}/{arg}.png", full_page=True)
                    emit("shot", problems=problems)
                elif command == "quit":
                    emit("bye", problems=problems)
                    return
                else:
                    raise ValueError(f"unknown command {command!r}")
        finally:
            browser.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the chat page")
    p.add_argument("--out", required=True, help="directory for the screenshots")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per step")
    args = p.parse_args()
    try:
        run(args)
    except Exception as e:  # reported to the test as data, not as a traceback to parse
        emit("error", message=f"{type(e).__name__}: {e}"[:2000])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
