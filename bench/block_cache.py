"""Cached block diffusion vs the official recompute-everything loop, side by side in one process.

Both modes run the same algorithm on the same random-weight backbone (the real architecture, narrower);
the cached one runs each denoising step over the active block only, against stored K/V of the blocks
before it. Prints progress lines, then one final JSON line:

    {"speedup": recompute_wall / cached_wall, "forwards_cached": n, "forwards_recompute": n,
     "outputs_equal": true, ...}

    python bench/block_cache.py            # hidden 256, 4 layers, 16 experts, 1024-token prompt, 256 new tokens
    python bench/block_cache.py --quick    # a smaller run (< 30 s)
    python bench/block_cache.py --device cuda --dtype bfloat16 --hidden 2048 --layers 4 --experts 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.generate import TextOptions, VocabLayout, generate_text
from runtime.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from runtime.testing.checkpoint import random_backbone_state, tiny_backbone_config


def build_model(args: argparse.Namespace) -> tuple[LLaDA2MoeModelLM, VocabLayout]:
    heads = max(2, args.hidden // 64)
    config = tiny_backbone_config(
        text_vocab_size=args.vocab,
        num_image_codes=args.codes,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 5 // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=64,
        num_experts=args.experts,
        num_experts_per_tok=min(8, args.experts // 2),
        n_group=min(8, args.experts // 2),
        topk_group=min(4, args.experts // 4),
        moe_intermediate_size=max(32, args.hidden // 4),
        max_position_embeddings=8192,
    )
    cfg = LLaDA2MoeConfig(**config)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(random_backbone_state(cfg, seed=0), strict=True)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    vocab = VocabLayout(mask_id=args.vocab - 1, eos_id=args.vocab - 2, image_offset=args.vocab,
                        num_image_codes=args.codes, vocab_size=args.vocab + args.codes)
    return model, vocab


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and lengths (< 30 s on a laptop CPU)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192, help="text vocabulary size")
    parser.add_argument("--codes", type=int, default=1024, help="image codes after the text vocabulary")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.experts, args.prompt, args.gen = 128, 2, 8, 512, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model, vocab = build_model(args)
    prompt = torch.randint(0, args.vocab - 2, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    # Random weights rarely pass the 0.95 threshold, so every block takes `steps` steps in both modes.
    options = TextOptions(max_new_tokens=args.gen, steps=args.steps, stop_ids=frozenset())
    generate_text(model, prompt[:64], vocab, TextOptions(max_new_tokens=32, steps=2, stop_ids=frozenset()))  # warm-up

    cached, cached_wall = timed(lambda: generate_text(model, prompt, vocab, options, mode="cached"))
    print(f"cached:    {cached_wall:8.2f} s  {cached.stats.forwards} forwards  "
          f"{len(cached.ids) / cached_wall:8.1f} tokens/s", flush=True)
    recompute, recompute_wall = timed(lambda: generate_text(model, prompt, vocab, options, mode="recompute"))
    print(f"recompute: {recompute_wall:8.2f} s  {recompute.stats.forwards} forwards  "
          f"{len(recompute.ids) / recompute_wall:8.1f} tokens/s", flush=True)

    print(json.dumps({
        "speedup": round(recompute_wall / cached_wall, 2),
        "forwards_cached": cached.stats.forwards,
        "forwards_recompute": recompute.stats.forwards,
        "outputs_equal": cached.ids == recompute.ids,
        "cached_s": round(cached_wall, 3),
        "recompute_s": round(recompute_wall, 3),
        "tokens_per_s_cached": round(len(cached.ids) / cached_wall, 1),
        "tokens_per_s_recompute": round(len(recompute.ids) / recompute_wall, 1),
        "generated_tokens": len(cached.ids),
        "prompt_tokens": args.prompt,
        "config": {"hidden": args.hidden, "layers": args.layers, "experts": args.experts,
                   "vocab": args.vocab + args.codes, "steps_per_block": args.steps},
        "device": str(model.device),
        "dtype": args.dtype,
    }))


if __name__ == "__main__":
    main()
