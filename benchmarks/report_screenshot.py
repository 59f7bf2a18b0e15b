"""Screenshot a `trl-guard report` page the way a user sees it: headless Chromium, at one or more window widths.

    python benchmarks/report_screenshot.py outputs/demo/report/index.html report.png
    python benchmarks/report_screenshot.py outputs/demo/report/index.html docs/images/report.png --widths 1000 1400

With several widths each screenshot is named after its width (`report_1000.png`, `report_1400.png`). The window is
`--height` pixels tall (tall enough for a whole report by default) and the blank space below the page is cut off, so
each PNG shows the full page and nothing more.

Needs Debian's chromium (`apt-get install chromium`) and Pillow for the trimming. Chromium is started without
networking extras, as this machine's closed network refuses them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile

# Page background (white) and how much of it to keep below the last drawn row.
BACKGROUND = (255, 255, 255)
BOTTOM_MARGIN = 24


def screenshot(page: str, output: str, width: int = 1400, height: int = 9000, trim: bool = True) -> str:
    """Write a `width` px wide screenshot of `page` to `output`; returns `output`."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    if not os.path.exists(page):
        raise SystemExit(f"{page} does not exist: build the report first (trl-guard report RUN_DIR ...).")
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
    if trim:
        trim_blank_bottom(output)
    return output


def trim_blank_bottom(path: str) -> tuple[int, int]:
    """Cut the background rows below the page's last drawn row (a fixed window is taller than most pages); returns
    the new size. A page taller than the window is left as it is, and the caller should raise `--height`."""
    from PIL import Image, ImageChops

    with Image.open(path) as image:
        image = image.convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, BACKGROUND)).getbbox()
    if box is None:
        return image.size
    bottom = min(image.height, box[3] + BOTTOM_MARGIN)
    if bottom >= image.height:
        print(f"{path}: the page may continue below {image.height} px; pass a larger --height to see all of it")
    image.crop((0, 0, image.width, bottom)).save(path)
    return image.width, bottom


def shrink(path: str) -> int:
    """Rewrite the PNG with a 256-colour palette (charts and flat samples lose nothing visible) to keep screenshots
    committed under docs/ small; returns the new size in bytes."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return os.path.getsize(path)


def output_for_width(output: str, width: int, several: bool) -> str:
    """`output` itself for one width; `<stem>_<width><ext>` for several."""
    if not several:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}_{width}{ext or '.png'}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", help="the report's index.html")
    parser.add_argument("output", help="PNG to write (with several --widths, the stem of one PNG per width)")
    parser.add_argument("--widths", type=int, nargs="+", default=[1400], help="window widths in px")
    parser.add_argument("--width", type=int, default=None, help="one window width (same as --widths WIDTH)")
    parser.add_argument("--height", type=int, default=9000, help="window height in px, cut to the page after")
    parser.add_argument("--no-trim", action="store_true", help="keep the blank space below the page")
    parser.add_argument("--palette", action="store_true", help="256-colour PNGs, a fraction of the size (for docs/)")
    options = parser.parse_args()
    widths = [options.width] if options.width is not None else options.widths
    for width in widths:
        path = output_for_width(options.output, width, len(widths) > 1)
        screenshot(options.page, path, width, options.height, trim=not options.no_trim)
        print(f"{path} ({shrink(path) if options.palette else os.path.getsize(path)} bytes)")
