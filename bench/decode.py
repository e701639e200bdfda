"""Normal (50 steps) vs turbo (8 steps) image decoding, side by side on one random-weight tiny checkpoint.

    python bench/decode.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--grid H W]

Both samplers decode the same codes with the same components resident; the time of each is the median of
the repeats after one warm-up. Normal makes steps-1 model calls, each on a batch of two (the codes' caption
and the all-zero one); turbo makes `steps` calls on one. The last line is JSON:
{"turbo_speedup": normal_s / turbo_s, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.testing.vision import write_tiny_vision_checkpoint
from runtime.vision.decoder import ImageDecoder

NORMAL_STEPS, TURBO_STEPS = 50, 8


def time_decode(
    decoder: ImageDecoder, codes: list[int], h: int, w: int, mode: str, steps: int, repeats: int
) -> float:
    """Median seconds of one decode of `codes` in `mode` after a warm-up decode."""
    times = []
    for i in range(repeats + 1):
        generator = torch.Generator().manual_seed(i)
        if decoder.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.decode(codes, h, w, mode=mode, steps=steps, generator=generator)
        if decoder.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2x2 grid and a single timed repeat")
    parser.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"), help="code grid (default 8 8)")
    parser.add_argument("--repeats", type=int, help="timed repeats per sampler (default 3, quick 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()

    h, w = args.grid or ((2, 2) if args.quick else (8, 8))
    repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny_vision_checkpoint(tmp, seed=0, num_codes=64)
        decoder = ImageDecoder(root, dtype=dtype, device=args.device)
        decoder.load()
        codes = [(7 * i + 3) % 64 for i in range(h * w)]
        normal_s = time_decode(decoder, codes, h, w, "normal", NORMAL_STEPS, repeats)
        turbo_s = time_decode(decoder, codes, h, w, "turbo", TURBO_STEPS, repeats)

    width, height = ImageDecoder.output_size(h, w)
    threads = torch.get_num_threads()
    print(f"grid {h}x{w} -> {width}x{height} px on {args.device} ({args.dtype}, {threads} threads)")
    print(f"normal {NORMAL_STEPS} steps ({NORMAL_STEPS - 1} calls x batch 2): {normal_s:.3f} s")
    print(f"turbo  {TURBO_STEPS} steps ({TURBO_STEPS} calls x batch 1):  {turbo_s:.3f} s")
    result = {
        "turbo_speedup": round(normal_s / turbo_s, 2),
        "normal_s": round(normal_s, 4),
        "turbo_s": round(turbo_s, 4),
        "normal_steps": NORMAL_STEPS,
        "turbo_steps": TURBO_STEPS,
        "step_ratio": NORMAL_STEPS / TURBO_STEPS,
        "model_call_ratio": round((NORMAL_STEPS - 1) / TURBO_STEPS, 3),
        "grid": [h, w],
        "output_px": [width, height],
        "device": args.device,
        "dtype": args.dtype,
        "threads": threads,
        "repeats": repeats,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
