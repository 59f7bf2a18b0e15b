"""Images per second of each built-in reward on this machine's CPU, without downloading any weights.

    python benchmarks/bench_rewards.py [--images 16] [--size 512] [--clip-size vit-h-14|vit-l-14|tiny]

PickScore and CLIP score run on a random CLIP of the real architecture (ViT-H/14 for PickScore, ViT-L/14 for CLIP
score and the aesthetic predictor), written to a temporary folder and loaded like a checkpoint, so the compute is the
real one. OCR uses rapidocr's bundled models on rendered text. The remote scorer is timed against a local server
that decodes the images and returns a score. ImageReward and HPSv2 need their extras and downloads: skipped.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from trl_guard.rewards import (
    AestheticReward,
    ClipScoreReward,
    PickScoreReward,
    RemoteReward,
    jpeg_compressibility,
)
from trl_guard.rewards.clip import AestheticHead
from trl_guard.testing import CLIP_SIZES, build_tiny_clip


def images_with_text(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        noise = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        image = noise.filter(ImageFilter.GaussianBlur(4))
        ImageDraw.Draw(image).text(
            (size // 8, size // 3), f"HELLO {i}", fill="black", font=ImageFont.load_default(size=size // 8)
        )
        out.append(image)
    return out


def local_server() -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps({"scores": [float(len(b)) for b in body["images"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/score"


def timed(reward, prompts, images) -> float:
    reward(prompts=prompts[:2], images=images[:2])  # load and warm up
    start = time.perf_counter()
    reward(prompts=prompts, images=images)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--clip-size", default="real", help="'real' (ViT-H/14, ViT-L/14) or 'tiny'")
    options = parser.parse_args()
    torch.set_num_threads(2)
    images = images_with_text(options.images, options.size)
    prompts = [f'a sign that says "HELLO {i}"' for i in range(options.images)]
    pick_size, clip_size = ("vit-h-14", "vit-l-14") if options.clip_size == "real" else ("tiny", "tiny")

    results = {"jpeg_compressibility": timed(jpeg_compressibility, prompts, images)}
    with tempfile.TemporaryDirectory() as folder:
        results[f"pickscore ({pick_size}, random)"] = timed(
            PickScoreReward(*[build_tiny_clip(f"{folder}/pick", size=pick_size)] * 2), prompts, images
        )
        clip_dir = build_tiny_clip(f"{folder}/clip", size=clip_size)
        results[f"clip_score ({clip_size}, random)"] = timed(ClipScoreReward(clip_dir), prompts, images)
        head = f"{folder}/head.pth"
        torch.save(AestheticHead(CLIP_SIZES[clip_size]["projection"]).state_dict(), head)
        results[f"aesthetic ({clip_size} + MLP, random)"] = timed(
            AestheticReward(clip_dir, head=head), prompts, images
        )
    from trl_guard.rewards.ocr import OcrReward

    results["ocr (rapidocr)"] = timed(OcrReward(), prompts, images)
    server, url = local_server()
    results["remote (local server, PNG)"] = timed(RemoteReward(url), prompts, images)
    server.shutdown()

    print(f"{options.images} images of {options.size}x{options.size}, CPU, 2 threads")
    for name, rate in results.items():
        print(f"  {name:<40} {rate:8.2f} images/s")


if __name__ == "__main__":
    main()
