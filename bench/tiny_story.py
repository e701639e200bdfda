"""How far the tiny model's stories get, through the SDK: frames drawn of those asked, turns that broke the
format, stories consistent frame to frame (`tiny_eval.py`'s `story_consistency`), and stories whose first
picture repeats a shape (the commonest way they go wrong).

The stories are `tiny_eval.py`'s (same seed, same prompts); prints one JSON line.

    python bench/tiny_story.py --samples 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llada_agent
from llada_agent.evaluation import EvalConfig, Evaluator, story_frames, story_is_consistent
from runtime.tiny import tasks


async def run(args: argparse.Namespace) -> dict:
    asked = drawn = malformed = consistent = repeats = 0
    rng = random.Random(f"{args.seed}-story_consistency")  # the stories `tiny_eval.py` tells
    async with llada_agent.load(args.model) as model:
        evaluator = Evaluator(model, EvalConfig())
        for _ in range(args.samples):
            example = tasks.sample_example("story", rng, holdout="exclude")
            reply = await evaluator.story(example)
            asked += sum(isinstance(p, tasks.ScenePart) for p in example.target.parts)
            frames = story_frames(reply)
            drawn += len(frames)
            malformed += reply.finish_reason == "malformed"
            consistent += story_is_consistent(example, reply)
            repeats += repeats_a_shape(frames)
    return {"stories": args.samples, "frames_asked": asked, "frames_drawn": drawn, "malformed": malformed,
            "consistent": consistent, "first_frame_repeats_a_shape": repeats}


def repeats_a_shape(frames: list) -> bool:
    """Whether the first picture holds two shapes of one kind and colour, which no training story opens with
    (its hero is the only one of its kind and colour)."""
    if not frames or frames[0][1] is None:
        return False
    shapes = [(shape.shape, shape.color) for shape in frames[0][1].shapes]
    return len(set(shapes)) < len(shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--seed", type=int, default=2026)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
