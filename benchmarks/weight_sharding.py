"""Benchmark: sharded transformer weights (FSDP2) against replicated ones, on CPU.

A thin wrapper over `diffusers_qwen_sp.bench.weight_sharding.measure_weight_sharding`: `--world` gloo processes (one thread
each) run a random-weight transformer under Ulysses `--world`, with replicated weights, sharded weights (the next
block's all-gather prefetched during the current one) and sharded weights without prefetch, interleaved over
`--rounds` rounds. It prints the parameter bytes each rank holds and the forward times with their ratio to the
replicated forward (medians of per-round ratios, the slowest rank's times), and fails if a sharded forward differs
from the replicated one by more than 1e-4.

    python benchmarks/weight_sharding.py                      # 8 blocks, 8 x 64 heads, 1024 image tokens: ~1 minute
    python benchmarks/weight_sharding.py --rounds 15          # more rounds on a busy machine
    python benchmarks/weight_sharding.py --layers 4 --image-side 16
"""

import argparse
import sys
from pathlib import Path


# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers_qwen_sp.bench.weight_sharding import measure_weight_sharding  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="processes and Ulysses degree (default 2)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=32, help="image tokens per side (32: 1024 tokens)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds after one warm-up round")
    args = parser.parse_args(argv)
    measurement = measure_weight_sharding(
        world_size=args.world, num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim,
        image_side=args.image_side, text_tokens=args.text_tokens, rounds=args.rounds,
    )
    print(measurement.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
