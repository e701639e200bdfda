"""Concurrent sessions on one engine: batched steps vs serving the same requests one at a time.

For 1, 4 and 16 concurrent conversations (each its own prompt and answer), runs the engine twice in one
process — batching every running request's active block into one forward (`max_active=N`), and serially
(`max_active=1`) — checks both give the same ids, and prints one final JSON line:

    {"batched_over_serial_16": x, "batched_over_serial_4": y, "tokens_per_s": {...}, "outputs_equal": true}

    python bench/concurrency.py [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.engine import Engine, TextRequest
from runtime.generate import TextOptions, VocabLayout
from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from runtime.testing.checkpoint import random_backbone_state, tiny_backbone_config

TEXT_VOCAB, CODES = 4096, 512


def build_model(hidden: int, layers: int, experts: int, device: str, dtype: str) -> LLaDA2MoeModelLM:
    config = LLaDA2MoeConfig(**tiny_backbone_config(
        text_vocab_size=TEXT_VOCAB, num_image_codes=CODES, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 128),
        head_dim=32, num_experts=experts, num_experts_per_tok=2, n_group=2, topk_group=1,
        moe_intermediate_size=hidden // 2, max_position_embeddings=4096))
    model = LLaDA2MoeModelLM(config)
    model.load_state_dict(random_backbone_state(config, seed=0))
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


async def serve(engine: Engine, requests: list[TextRequest]) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.submit(r).result() for r in requests))
    return [r.ids for r in results], time.perf_counter() - start


def run(model: LLaDA2MoeModelLM, vocab: VocabLayout, requests: list[TextRequest], max_active: int):
    engine = Engine(model, vocab, max_active=max_active, cache_enabled=False)
    try:
        ids, wall = asyncio.run(serve(engine, requests))
    finally:
        engine.close()
    return ids, wall, engine.stats.forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=200, help="prompt tokens per session (varied +-50%)")
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.prompt, args.gen = 2, 100, 32
    torch.set_grad_enabled(False)

    model = build_model(args.hidden, args.layers, args.experts, args.device, args.dtype)
    vocab = VocabLayout(mask_id=TEXT_VOCAB - 1, eos_id=TEXT_VOCAB - 2, image_offset=TEXT_VOCAB,
                        num_image_codes=CODES, vocab_size=TEXT_VOCAB + CODES)
    options = TextOptions(max_new_tokens=args.gen, steps=16, stop_ids=frozenset())
    generator = torch.Generator().manual_seed(0)

    def requests(n: int) -> list[TextRequest]:
        lengths = torch.randint(args.prompt // 2, args.prompt * 3 // 2, (n,), generator=generator).tolist()
        return [TextRequest(torch.randint(0, TEXT_VOCAB - 2, (length,), generator=generator).tolist(), options)
                for length in lengths]

    run(model, vocab, requests(2), 2)  # warm-up
    report: dict = {"tokens_per_s": {}, "forwards": {}, "outputs_equal": True}
    for n in (1, 4, 16):
        batch = requests(n)
        batched_ids, batched_wall, batched_forwards = run(model, vocab, batch, n)
        serial_ids, serial_wall, serial_forwards = run(model, vocab, batch, 1)
        tokens = sum(len(ids) for ids in batched_ids)
        equal = batched_ids == serial_ids
        report["outputs_equal"] &= equal
        report[f"batched_over_serial_{n}"] = round(serial_wall / batched_wall, 2)
        report["tokens_per_s"][str(n)] = {"batched": round(tokens / batched_wall, 1),
                                          "serial": round(tokens / serial_wall, 1)}
        report["forwards"][str(n)] = {"batched": batched_forwards, "serial": serial_forwards}
        print(f"{n:2d} sessions: batched {batched_wall:6.2f} s ({batched_forwards} forwards), "
              f"serial {serial_wall:6.2f} s ({serial_forwards} forwards), equal ids: {equal}", flush=True)
    report["config"] = {"hidden": args.hidden, "layers": args.layers, "experts": args.experts,
                        "prompt": args.prompt, "gen": args.gen, "device": args.device, "dtype": args.dtype}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
