"""Round time with several remote rewards of known latency: called one after another (plain functions) against
awaited concurrently (`async def`), on the tiny SD3 pipeline (CPU).

    python benchmarks/bench_async_rewards.py [--rewards 3] [--latency 0.5] [--rounds 4]

Each reward is a `RemoteReward` against a local server that answers after `--latency` seconds. The async variant
wraps the same client in `async def reward(...): return await asyncio.to_thread(remote, ...)`. A round samples two
micro-batches of 4 images, so it calls each reward twice; scoring overlaps sampling (`overlap_reward_scoring`) in
both variants. The time of a round is the trainer's `_generate_and_score` (sampling, scoring, advantages); the
median over the rounds is printed, the first round (warm-up) left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from datasets import Dataset
from peft import LoraConfig
from transformers import PrinterCallback

from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
from trl_guard.rewards import RemoteReward
from trl_guard.testing import build_tiny_sd3_pipeline


def start_server(latency: float) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            body = json.dumps({"scores": [0.5] * len(batch["images"])}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def as_async(remote: RemoteReward):
    async def reward(prompts, images, **kwargs):
        return await asyncio.to_thread(remote, prompts, images, **kwargs)

    reward.__name__ = remote.__name__
    return reward


def round_times(reward_funcs: list, rounds: int) -> list[float]:
    pipeline = build_tiny_sd3_pipeline()
    with tempfile.TemporaryDirectory() as output_dir:
        args = GuardConfig(
            output_dir=output_dir,
            num_generations=4,
            per_device_train_batch_size=4,
            steps_per_generation=2,
            gradient_accumulation_steps=2,
            max_steps=rounds,
            height=32,
            width=32,
            max_sequence_length=16,
            num_inference_steps=8,
            guidance_scale=1.0,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1,
            seed=0,
        )
        prompts = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(8)]})
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["attn.to_q", "attn.to_v"])
        trainer = GuardGRPODiffusionTrainer(
            model=pipeline, reward_funcs=reward_funcs, args=args, train_dataset=prompts, peft_config=lora
        )
        times: list[float] = []
        generate = trainer._generate_and_score

        def timed(*a, **k):
            start = time.perf_counter()
            result = generate(*a, **k)
            times.append(time.perf_counter() - start)
            return result

        trainer._generate_and_score = timed
        trainer.remove_callback(PrinterCallback)  # one log dict per step would drown the table
        trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=4)
    options = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    server, url = start_server(options.latency)
    try:
        remotes = [RemoteReward(f"{url}/{i}", name=f"remote{i}") for i in range(options.rewards)]
        results = {}
        for label, funcs in (
            ("none (baseline)", [lambda prompts, images, **kw: [0.0] * len(images)]),
            ("sequential", remotes),
            ("async", [as_async(r) for r in remotes]),
        ):
            times = round_times(funcs, options.rounds)[1:]
            results[label] = statistics.median(times)
        print(
            f"{options.rewards} remote rewards of {options.latency:g} s latency, 2 micro-batches of 4 images per round"
        )
        print("| scoring | s per round (median) |")
        print("|---|---|")
        for label, seconds in results.items():
            print(f"| {label} | {seconds:.2f} |")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
