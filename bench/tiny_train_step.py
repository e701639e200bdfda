"""Seconds per training step of the tiny backbone's two stages, as `python -m runtime.tiny.train all` runs them,
one process against a team of data-parallel workers (`runtime.tiny.train.Team`) side by side.

Each stage's own loop (`runtime.tiny.train.train_backbone`: data, forward, backward, the team's gradient
exchange, optimizer, expert balancing, saves) runs in a scratch copy of the bundled checkpoint: `backbone`
trains a fresh model on PRETRAIN's mixture, `finetune` the bundled one on FINETUNE's. Each configuration runs
--steps and then twice --steps from the start; the difference over --steps is the rate of steps past the
start, without the one-off costs (starting the workers, loading) a real run of thousands of steps does not
notice. The final JSON line gives seconds a step of each stage and team size, the team's speed-up, and the
minutes `all` spends in the two backbone stages at those rates (the vision stages come on top).

    python bench/tiny_train_step.py            # ~5 min on two cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from runtime.checkpoint import TINY_CHECKPOINT
from runtime.tiny import train


def seconds(recipe: train.Recipe, steps: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "checkpoint"
        shutil.copytree(TINY_CHECKPOINT, out)
        started = time.perf_counter()
        train.train_backbone(out, Path(scratch) / "work", seed=0, steps=steps, resume=False, recipe=recipe,
                             workers=workers)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="steps timed per stage and team size")
    parser.add_argument("--threads", type=int, default=train.THREADS, help="threads, shared by a team's workers")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, train.WORKERS], help="team sizes to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train.keep_freed_memory()
    torch.set_flush_denormal(True)
    report = {}
    for recipe in (train.PRETRAIN, train.FINETUNE):
        for workers in args.workers:
            rate = (seconds(recipe, 2 * args.steps, workers) - seconds(recipe, args.steps, workers)) / args.steps
            report[f"{recipe.name}/{workers}"] = round(rate, 3)
        first, last = args.workers[0], args.workers[-1]
        if first != last:
            report[f"{recipe.name} speed-up {first}->{last}"] = round(
                report[f"{recipe.name}/{first}"] / report[f"{recipe.name}/{last}"], 2)
    # What `python -m runtime.tiny.train all` spends in its backbone stages at these rates, as it runs them
    # (a team of train.WORKERS when timed, else the last size timed); the vision stages come on top.
    workers = train.WORKERS if train.WORKERS in args.workers else args.workers[-1]
    stages = (train.BACKBONE_STEPS * report[f"backbone/{workers}"]
              + train.FINETUNE_STEPS * report[f"finetune/{workers}"])
    report["backbone stages minutes"] = round(stages / 60, 1)
    print(json.dumps({**report, "threads": args.threads}))


if __name__ == "__main__":
    main()
