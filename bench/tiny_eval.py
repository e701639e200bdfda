"""Accuracy of a model on fresh scenes of the tiny shapes world, through the public SDK.

Each metric replays `--samples` fresh examples of one task family (held-in scenes for the main metrics;
held-out compositions — purple triangles, orange squares at the bottom-right — for `holdout_*`): QA and
captions are compared as text, drawings are decoded and read back by the world's pixel checker.
`critique_gain` is the think-then-draw agent's success with self-critique minus without, on 3-shape riddles.
Prints a line per metric, then one final JSON line of accuracies.

    python bench/tiny_eval.py                      # the bundled tiny model, 50 samples per metric
    python bench/tiny_eval.py --samples 10 --metrics qa t2i
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llada_agent
from llada_agent.evaluation import ALL_METRICS, EvalConfig, evaluate


async def run(args: argparse.Namespace) -> dict:
    config = EvalConfig(samples=args.samples, seed=args.seed, decoder_mode=args.decoder,
                        decoder_steps=args.decoder_steps, image_steps=args.image_steps, families=args.metrics)
    started = time.perf_counter()

    def progress(metric: str, done: int, total: int) -> None:
        if done == total:
            print(f"{metric:<18} done ({time.perf_counter() - started:6.0f} s so far)", flush=True)

    async with llada_agent.load(args.model, device=args.device) as model:
        scores = await evaluate(model, config, progress)
    return {**scores, "samples": args.samples, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--metrics", nargs="+", default=list(ALL_METRICS), choices=ALL_METRICS)
    parser.add_argument("--decoder", default=None, choices=["normal", "turbo"], help="default: the model's")
    parser.add_argument("--decoder-steps", type=int, default=None)
    parser.add_argument("--image-steps", type=int, default=8, help="denoising steps per block for pictures")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
