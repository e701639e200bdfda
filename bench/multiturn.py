"""An 8-turn visual conversation: a session whose history stays cached vs a stateless client.

The stateless client is what today's only server offers for this model: every turn re-sends the whole
history (pictures included), which the server reads and prefills again (blocks are still cached *within* a
request). The session keeps its history as exact token ids and the engine's prefix cache keeps their K/V,
so each turn computes only its own new blocks. Both run in one process on the same random-weight
checkpoint (the real architecture, small), written to a temporary folder in the official layout.

Prints a line per turn, then one final JSON line:

    {"turn8_speedup": x, "total_speedup": y, "cache_hit_ratio": z, ...}

    python bench/multiturn.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llada_agent
from llada_agent import ImagePart, Message, Session, TextOptions
from runtime.testing.checkpoint import write_tiny_checkpoint
from runtime.testing.vision import write_tiny_vision_checkpoint

QUESTIONS = [
    "What is in this picture?", "Describe the colours you see.", "Here is another one. What changed?",
    "Which of the two is brighter?", "One more picture: what does it show?", "Compare all three pictures.",
    "Which one would you pick for a poster?", "Summarise our conversation in one sentence.",
]
PICTURE_TURNS = {0, 2, 4}


def picture(seed: int, size: int) -> ImagePart:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size // 16, size // 16, 3)) * 255).astype(np.uint8).repeat(16, 0).repeat(16, 1)
    from PIL import Image

    return ImagePart.from_pil(Image.fromarray(pixels))


def write_checkpoint(root: Path, hidden: int, layers: int) -> None:
    heads = hidden // 32
    write_tiny_checkpoint(root, config_overrides={
        "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4), "head_dim": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": hidden // 2,
        "max_position_embeddings": 8192})
    write_tiny_vision_checkpoint(root)


async def conversation(root: Path, size: int, options: TextOptions) -> dict:
    turns: list[dict] = []
    async with llada_agent.load(root) as cached, llada_agent.load(root, cache=False) as stateless:
        session = cached.session(mode="chat")
        history: list[Message] = []
        for turn, question in enumerate(QUESTIONS):
            content = [picture(turn, size), question] if turn in PICTURE_TURNS else [question]

            start = time.perf_counter()
            reply = await session.send(content, task="chat", options=options)
            session_s = time.perf_counter() - start

            start = time.perf_counter()
            fresh = await Session.from_messages(stateless, history, mode="chat")
            again = await fresh.send(content, task="chat", options=options)
            stateless_s = time.perf_counter() - start

            history = [m for m in session.messages]
            turns.append({"turn": turn + 1, "session_s": session_s, "stateless_s": stateless_s,
                          "prompt_tokens": reply.usage.prompt_tokens, "cached_tokens": reply.usage.cached_tokens,
                          "stateless_prompt_tokens": again.usage.prompt_tokens})
            print(f"turn {turn + 1}: prompt {reply.usage.prompt_tokens:5d} tokens "
                  f"({reply.usage.cached_tokens:5d} cached)  session {session_s:6.2f} s  "
                  f"stateless {stateless_s:6.2f} s", flush=True)
    return {"turns": turns}


def arguments(description: str) -> argparse.Namespace:
    """The command line of this bench and of bench/remote.py: the model's and the conversation's sizes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller pictures and model")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--picture", type=int, default=512, help="picture side in pixels (a 32x32 grid at 512)")
    parser.add_argument("--answer", type=int, default=32, help="tokens per answer")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.picture = 128, 2, 256
    return args


def main() -> None:
    args = arguments(__doc__)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_checkpoint(root, args.hidden, args.layers)
        # Random weights never stop early: a fixed answer length keeps both clients doing equal work.
        options = TextOptions(max_tokens=args.answer, steps=8, threshold=None)
        report = asyncio.run(conversation(root, args.picture, options))

    print(json.dumps(summary(report["turns"], args)))


def summary(turns: list[dict], args: argparse.Namespace) -> dict:
    """The final JSON line of a run: turns of {session_s, stateless_s, prompt_tokens, cached_tokens}."""
    prompt = sum(t["prompt_tokens"] for t in turns)
    return {
        "turn8_speedup": round(turns[-1]["stateless_s"] / turns[-1]["session_s"], 2),
        "total_speedup": round(sum(t["stateless_s"] for t in turns) / sum(t["session_s"] for t in turns), 2),
        "cache_hit_ratio": round(sum(t["cached_tokens"] for t in turns) / prompt, 3),
        "turn8_prompt_tokens": turns[-1]["prompt_tokens"],
        "turn8_cached_tokens": turns[-1]["cached_tokens"],
        "session_s": [round(t["session_s"], 3) for t in turns],
        "stateless_s": [round(t["stateless_s"], 3) for t in turns],
        "config": {"hidden": args.hidden, "layers": args.layers, "picture_px": args.picture,
                   "answer_tokens": args.answer},
    }


if __name__ == "__main__":
    main()
