"""Screenshot a `trl-guard report` page the way a user sees it: headless Chromium, 1400 px wide, the full page.

    python benchmarks/report_screenshot.py outputs/demo/report/index.html report.png [--height 3000]

Needs Debian's chromium (`apt-get install chromium`). Chromium is started without networking extras, as this
machine's closed network refuses them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile


def screenshot(page: str, output: str, width: int = 1400, height: int = 3000) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
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
                f"--window-size={width},{height}",
                f"--screenshot={os.path.abspath(output)}",
                "file://" + os.path.abspath(page),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page")
    parser.add_argument("output")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=3000)
    options = parser.parse_args()
    print(screenshot(options.page, options.output, options.width, options.height))
