"""Where a tiny checkpoint goes wrong: accuracy broken down by what each example asks.

`tiny_eval.py` says how often a family is right; this says which part fails, with the training probe
(`runtime.tiny.train.Probe`: the conversation format and the sampler, no session around them):

- `qa`: answers right per question kind (colour, shape, position, count, yes/no);
- `riddle_thinking`: pictures right when the written plan is right and when it is wrong (the SDK metric
  counts the picture alone; a plan may also end without a well-formed picture header);
- `multiturn`: second pictures right per edit kind of the second turn and whether the first came out right;
- `edit`: pictures right per edit kind (recolour, move, add, remove).
- `holdout_t2i`: descriptions holding a purple triangle (held out of training), pictures right per what
  was drawn in the purple triangle's cell.

Prints each wrong example with `--show`, then one final JSON line of "right/total" per kind.

    python bench/tiny_errors.py --samples 100 --families qa riddle_thinking
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from runtime.checkpoint import TINY_CHECKPOINT
from runtime.tiny import tasks
from runtime.tiny.train import Probe

FAMILIES = ("qa", "riddle_thinking", "multiturn", "edit", "holdout_t2i")


def pictures(example: tasks.Example) -> list:
    return [p.scene for turn in example.turns if turn.role == "assistant" for p in turn.parts
            if isinstance(p, tasks.ScenePart)]


def question(probe: Probe, example: tasks.Example) -> tuple[str, bool, str]:
    answer = probe.answer(example)
    return example.subtype, answer == example.target.parts[0].text, answer


def riddle(probe: Probe, example: tasks.Example) -> tuple[str, bool, str]:
    plan, drawn = probe.think_then_draw(example)
    if plan is None:
        return "no well-formed picture", False, "-"
    plan_ok = plan == example.target.parts[0].text
    return f"plan {'right' if plan_ok else 'wrong'}", drawn == pictures(example)[0], f"{plan} -> {drawn}"


def second_turn(probe: Probe, example: tasks.Example) -> tuple[str, bool, str]:
    first, second = probe.two_turns(example)
    want = pictures(example)
    return (f"{example.subtype}, first picture {'right' if first == want[0] else 'wrong'}", second == want[1],
            str(second))


def edit(probe: Probe, example: tasks.Example) -> tuple[str, bool, str]:
    drawn = probe.edit(example)
    return example.subtype, drawn == pictures(example)[0], str(drawn)


def held_out_drawing(probe: Probe, example: tasks.Example) -> tuple[str, bool, str]:
    """A description holding a purple triangle (never in training), and what was drawn in its cell."""
    want = pictures(example)[0]
    drawn = probe.draw(example)
    cell = next(s.cell for s in want.shapes if (s.shape, s.color) == ("triangle", "purple"))
    there = drawn.at(cell) if drawn is not None else None
    return (f"purple triangle drawn as {f'{there.color} {there.shape}' if there else 'nothing'}", drawn == want,
            str(drawn))


# Families that are another family's examples drawn differently: (family, holdout) for `sample_example`.
SAMPLED_AS = {"holdout_t2i": ("t2i", "only")}
CHECKS = {"qa": question, "riddle_thinking": riddle, "multiturn": second_turn, "edit": edit,
          "holdout_t2i": held_out_drawing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TINY_CHECKPOINT, help="a tiny checkpoint folder")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show", action="store_true", help="print every wrong example")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe = Probe(args.model)
    report = {}
    for family in args.families:
        rng = random.Random(f"{args.seed}-{family}")
        right, total = Counter(), Counter()
        for _ in range(args.samples):
            sampled, holdout = SAMPLED_AS.get(family, (family, "exclude"))
            example = tasks.sample_example(sampled, rng, holdout)
            key, ok, got = CHECKS[family](probe, example)
            total[key] += 1
            right[key] += ok
            if args.show and not ok:
                asked = " | ".join(p.text for turn in example.turns if turn.role == "user" for p in turn.parts
                                   if isinstance(p, tasks.TextPart))
                print(f"{family} [{key}] {asked!r} -> {got}", flush=True)
        report[family] = {key: f"{right[key]}/{total[key]}" for key in sorted(total)}
        print(f"{family}: {report[family]}", flush=True)
    print(json.dumps({**report, "samples": args.samples, "seed": args.seed}))


if __name__ == "__main__":
    main()
