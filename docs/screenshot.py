"""Take the README's screenshot of a report page with Debian's chromium (Playwright, no downloaded browser).

    dct-audit demo --out reports
    python docs/screenshot.py reports/demo-biased/report/classes/0004-cross.html docs/class-page.png

Fails with one line when the page is missing, the browser is missing, or the page logs an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="an HTML page of a rendered report")
    parser.add_argument("out", type=Path, help="PNG to write (e.g. docs/class-page.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    if not args.page.is_file():
        sys.exit(f"screenshot: no page at {args.page}; run `dct-audit demo --out reports` first")
    if not CHROMIUM.exists():
        sys.exit("screenshot: needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("screenshot: needs Playwright for Python (pip install playwright)")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(args.page.resolve().as_uri())
        page.wait_for_load_state("load")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))  # the first screen: summary, findings, the first image grids
        browser.close()
    if errors:
        sys.exit(f"screenshot: the page logged errors: {errors[0]}")
    print(f"{args.out} ({args.out.stat().st_size} bytes) of {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
