"""Seconds per training step of the tiny backbone's two stages, as `python -m runtime.tiny.train all` runs them.

Each stage's own loop (`runtime.tiny.train.train_backbone`: data, forward, backward, optimizer, expert
balancing, the final save) runs a few dozen steps in a scratch copy of the bundled checkpoint: `backbone`
trains a fresh model on PRETRAIN's mixture, `finetune` the bundled one on FINETUNE's. The final JSON line gives
seconds a step of each (steps late in a real run are somewhat slower: the committed fine-tune took ~1.1 s).

    python bench/tiny_train_step.py            # ~2 min on two cores
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


def seconds_per_step(recipe: train.Recipe, steps: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "checkpoint"
        shutil.copytree(TINY_CHECKPOINT, out)
        started = time.perf_counter()
        train.train_backbone(out, Path(scratch) / "work", seed=0, steps=steps, resume=False, recipe=recipe)
        return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps timed per stage")
    parser.add_argument("--threads", type=int, default=train.THREADS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train.keep_freed_memory()
    torch.set_flush_denormal(True)
    report = {}
    for recipe in (train.PRETRAIN, train.FINETUNE):
        report[recipe.name] = round(seconds_per_step(recipe, args.steps), 3)
    print(json.dumps({**report, "threads": args.threads}))


if __name__ == "__main__":
    main()
