"""Benchmark: our sequence parallelism against diffusers' own context parallelism, per forward.

A thin wrapper over `python -m diffusers_qwen_sp bench` (the code is `diffusers_qwen_sp/bench/`) restricted to the
per-forward rows: the stock diffusers forward in one process (the reference), our Ulysses and our Ring, and
diffusers' `enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))` on the same weights. It keeps this
script's workload as defaults: 4 layers, 8 heads x 64, 512x768 px = 1536 image tokens, 64 text tokens of which 16 are
masked, fp32, 2 gloo processes x 1 thread, medians of 7 interleaved rounds. Every option of the bench command is
accepted and overrides them:

    python benchmarks/bench_sequence_parallel.py                     # about 30 s on 2 idle cores
    python benchmarks/bench_sequence_parallel.py --width 1024 --text-tokens 128 --text-padding 32
    python benchmarks/bench_sequence_parallel.py --height 400 --width 496   # 25x31 = 775 tokens: diffusers CP n/a
    python benchmarks/bench_sequence_parallel.py --help

It writes bench.json, bench.md and bench.png into bench-results/sequence_parallel/ (`--output-dir`) and prints the
table: time per forward and the ratio to the stock forward, the max |diff| of every call against the stock output,
and the bytes each rank sends per forward against the analytic minimum of each algorithm, term by term.
"""

import sys
from pathlib import Path


# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers_qwen_sp.cli import main  # noqa: E402


DEFAULTS = [
    "--rows", "stock,ulysses,ring,diffusers-cp",
    "--phases", "forward",
    "--height", "512",
    "--width", "768",
    "--forward-repeats", "7",
    "--output-dir", "bench-results/sequence_parallel",
]


if __name__ == "__main__":
    # argparse keeps the last value of an option: the user's, given after the defaults.
    sys.exit(main(["bench", *DEFAULTS, *sys.argv[1:]]))
