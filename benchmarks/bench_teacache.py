"""Benchmark: TeaCache's speed-up and drift over a whole denoising loop, with and without Ulysses, on CPU.

A thin wrapper over `python -m diffusers_qwen_sp bench` (the code is `diffusers_qwen_sp/bench/`) restricted to the
per-image rows around TeaCache: the stock diffusers pipeline (the reference), ours uncached without SP and under
Ulysses over `--world` processes, ours with TeaCache at each threshold, and TeaCache under Ulysses. It keeps this
script's workload as defaults: a random-weight transformer of 8 layers, 4 heads x 64, 512x512 px = 32x32 image
tokens, true CFG, 20 steps, fp32, 2 gloo processes x 1 thread, medians of 3 interleaved rounds. Every option of the
bench command is accepted and overrides them:

    python benchmarks/bench_teacache.py                                  # 8-15 minutes on 2 busy cores
    python benchmarks/bench_teacache.py --thresholds 0 0.1 0.2 0.4 0.8   # 0: what the hook itself costs
    python benchmarks/bench_teacache.py --world 1                        # no SP rows (they are reported n/a)
    python benchmarks/bench_teacache.py --help

It writes bench.json, bench.md and bench.png into bench-results/teacache/ (`--output-dir`) and prints the table: the
time per image and its ratio to stock and to the uncached row of the same parallelism, the transformer calls TeaCache
computed (and the ideal speed-up, calls / computed), the steps it computed per CFG branch, and the PSNR of the final
latents against the stock ones. The weights are random: the PSNR measures drift from the uncached trajectory, not
image quality (for that, `python -m diffusers_qwen_sp bench-teacache` on the trained scene model).
"""

import sys
from pathlib import Path


# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers_qwen_sp.cli import main  # noqa: E402


DEFAULTS = [
    "--rows", "stock,ours,ulysses,teacache,sp-teacache",
    "--phases", "image",
    "--layers", "8",
    "--heads", "4",
    "--head-dim", "64",
    "--height", "512",
    "--width", "512",
    "--steps", "20",
    "--thresholds", "0.1", "0.2", "0.4",
    "--image-repeats", "3",
    "--output-dir", "bench-results/teacache",
]


if __name__ == "__main__":
    # argparse keeps the last value of an option: the user's, given after the defaults.
    sys.exit(main(["bench", *DEFAULTS, *sys.argv[1:]]))
