"""`make demo-check`: re-check the demo page and re-take its screenshot.

Checks ``out/demo/index.html`` (written by ``make demo``): it exists, every link
is a local file that exists, and it shows stylized images; then renders it in
headless Chromium into ``out/demo/screenshot.png``. Exit code 1 on any problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.demo.page import OUT, check_page, screenshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cli.demo.check", description="check the demo page and screenshot it"
    )
    parser.add_argument("--page", type=Path, default=OUT / "index.html")
    parser.add_argument("--screenshot", type=Path, default=OUT / "screenshot.png")
    args = parser.parse_args(argv)
    problems, stylized = check_page(args.page)
    if not problems and stylized == 0:
        problems.append("the page shows no stylized images")
    for p in problems:
        print(f"problem: {p}")
    why_not = screenshot(args.page, args.screenshot, height=4000) if args.page.exists() else "no page"
    print(f"page {args.page}: {'OK' if not problems else f'{len(problems)} problems'}, {stylized} stylized images")
    print(f"screenshot: {args.screenshot if not why_not else 'not taken: ' + why_not}")
    return 1 if problems or why_not else 0


if __name__ == "__main__":
    sys.exit(main())
