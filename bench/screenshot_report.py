"""Screenshot a comparison's report.html in headless Chromium, to check plots, tables and layout by eye.

Needs Debian's `chromium` (apt-get install -y chromium). Writes OUT.png (default: next to the report).

    python bench/screenshot_report.py adaptlab-demo/report.html [--out shot.png] [--width 1280] [--height 4000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium found: apt-get update && apt-get install -y chromium")


def screenshot(report: Path, out: Path, width: int, height: int) -> Path:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out.resolve()}",
            f"--window-size={width},{height}",
            report.resolve().as_uri(),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()
    if not args.report.is_file():
        sys.exit(f"{args.report}: no such file")
    out = args.out or args.report.with_name("report_screenshot.png")
    print(screenshot(args.report, out, args.width, args.height))


if __name__ == "__main__":
    main()
