"""Benchmark: TeaCache speed-up and drift on a full Qwen-Image pipeline, on CPU.

Run:

    python benchmarks/bench_teacache.py                                # defaults: about 2.5 minutes on 1 core
    python benchmarks/bench_teacache.py --world 2                      # Ulysses-2 SP, 2 gloo processes: about 2 minutes
    python benchmarks/bench_teacache.py --thresholds 0 0.1 0.2 0.4 0.8 # 0: the cost of the hook itself

On a `QwenImageSPPipeline` built from the tiny random-weight components (text encoder, VAE, tokenizer, scheduler) but
with a mid-size random-weight transformer (default 8 layers, 4 heads x 64, 32x32 image tokens = 256x256 px, true CFG
with a negative prompt, 20 steps, fp32, batch 1, one intra-op thread per process), one run measures, interleaved
(every round runs every variant once, in an order rotated per round) and as medians over `--repeats` rounds after
`--warmup` untimed rounds, so that ratios hold on a noisy machine:

1. the wall-clock of the whole pipeline call, uncached and with TeaCache at each `--thresholds` value; the speed-up
   over uncached, beside the ideal one, (transformer calls) / (calls whose blocks were computed), read from
   `teacache_stats` of both CFG branches;
2. the CPU time of the pipeline call (the slowest rank's), which other processes on a shared machine do not inflate
   as they do the wall-clock; and the wall-clock time spent inside the transformer's forward (measured with forward
   hooks on the instance), which the ideal speed-up is about: the text encoder, the scheduler and the VAE decode are
   never skipped, and TeaCache's own preprocess, indicator and postprocess still run on skipped steps;
3. the PSNR of the cached image (`output_type="pt"`, in [0, 1]) against the uncached one, and the relative L2 error
   of the final latents (captured with `callback_on_step_end`).

With `--world 2` (or more) every rank runs the pipeline under Ulysses sequence parallelism
(`pipe.enable_sequence_parallel(ulysses_degree=world)`), times are the slowest rank's, and the script checks that all
ranks report the same skip lists and return the same image.

The weights are random: the "image" is not a picture, so the PSNR says how far a cached trajectory drifts from the
uncached one on this model, not whether the cached image looks good. The default coefficients were fitted on the real
Qwen-Image, not on this model, so the skip patterns differ from those of a real checkpoint as well.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from diffusers_qwen_sp.bench import psnr, rope_axes, rotated, step_ranges  # noqa: E402
from diffusers_qwen_sp.hooks.teacache import (  # noqa: E402
    TeaCacheConfig,
    apply_teacache,
    remove_teacache,
    teacache_stats,
)
from diffusers_qwen_sp.pipelines import QwenImageSPPipeline  # noqa: E402
from diffusers_qwen_sp.testing import (  # noqa: E402
    build_tiny_components,
    tiny_pipeline_call_kwargs,
    tiny_transformer_config,
)
from diffusers_qwen_sp.testing.multiprocess import run_distributed  # noqa: E402


VARIANT = "qwen_image"
UNCACHED = "uncached"
# Pixels per image token: the tiny VAE downsamples by 4, the transformer patches 2x2.
PIXELS_PER_TOKEN = 8
CFG_SCALE = 4.0
BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class BenchConfig:
    layers: int = 8
    heads: int = 4
    head_dim: int = 64
    size: int = 32
    steps: int = 20
    thresholds: tuple[float, ...] = (0.1, 0.2, 0.4)
    world: int = 1
    threads: int = 1
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    timeout: float = 1800.0
    variants: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", (UNCACHED, *(teacache_name(t) for t in self.thresholds)))

    @property
    def pixels(self) -> int:
        return self.size * PIXELS_PER_TOKEN

    def transformer_config(self) -> dict[str, Any]:
        # in/out channels and the text dim (32) stay those of the tiny VAE and text encoder.
        return tiny_transformer_config(
            VARIANT,
            num_layers=self.layers,
            num_attention_heads=self.heads,
            attention_head_dim=self.head_dim,
            axes_dims_rope=rope_axes(self.head_dim),
        )


def teacache_name(threshold: float) -> str:
    return f"TeaCache {threshold:g}"


def threshold_of(bench: BenchConfig, name: str) -> float | None:
    return None if name == UNCACHED else bench.thresholds[bench.variants.index(name) - 1]


# ---------------------------------------------------------------------------------------------------------------------
# The worker (one per rank; also for --world 1, so both runs take the same path)
# ---------------------------------------------------------------------------------------------------------------------


def build_pipeline(bench: BenchConfig) -> QwenImageSPPipeline:
    components = build_tiny_components(VARIANT, seed=bench.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(bench.seed)  # same weights on every rank and in every run
        components["transformer"] = QwenImageTransformer2DModel(**bench.transformer_config()).eval()
    pipe = QwenImageSPPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TransformerTimer:
    """Seconds spent in the transformer's forward (TeaCache's hook included), summed over the calls of one run."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        # torch forward hooks on this instance only; they wrap whatever forward the diffusers hooks installed.
        transformer.register_forward_pre_hook(self._pre)
        transformer.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.total += time.perf_counter() - self._start


def _bench_worker(rank: int, world: int, bench: BenchConfig) -> dict[str, Any]:
    torch.set_num_threads(bench.threads)
    diffusers_logging.set_verbosity_error()
    pipe = build_pipeline(bench)
    if world > 1:
        pipe.enable_sequence_parallel(ulysses_degree=world)
    timer = TransformerTimer(pipe.transformer)

    times: dict[str, list[float]] = {name: [] for name in bench.variants}
    transformer_times: dict[str, list[float]] = {name: [] for name in bench.variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in bench.variants}
    stats: dict[str, list[dict[str, Any]]] = {name: [] for name in bench.variants}
    images: dict[str, torch.Tensor] = {}
    latents: dict[str, torch.Tensor] = {}
    # Largest difference of any later call of a variant to its first one: every call uses the same seed.
    round_drift: dict[str, float] = {name: 0.0 for name in bench.variants}

    def call(name: str) -> tuple[float, float, float]:
        """One pipeline call of `name` on every rank; returns the slowest rank's (wall, transformer wall, CPU) s."""
        threshold = threshold_of(bench, name)
        if threshold is not None:
            apply_teacache(pipe.transformer, TeaCacheConfig(threshold=threshold))
        final: dict[str, torch.Tensor] = {}

        def keep_latents(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if step == bench.steps - 1:
                final["latents"] = tensors["latents"].clone()
            return tensors

        kwargs = tiny_pipeline_call_kwargs(
            VARIANT,
            num_inference_steps=bench.steps,
            height=bench.pixels,
            width=bench.pixels,
            true_cfg_scale=CFG_SCALE,
            generator=torch.Generator("cpu").manual_seed(bench.seed),
            callback_on_step_end=keep_latents,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        timer.total = 0.0
        if world > 1:
            dist.barrier()  # start together; the barrier is outside the timed window
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            image = pipe(**kwargs).images[0]
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if threshold is not None:
            stats[name].append(teacache_stats(pipe.transformer))
            remove_teacache(pipe.transformer)
        else:
            stats[name].append({})
        if name in images:
            drift_image = (image - images[name]).abs().max().item()
            drift_latents = (final["latents"] - latents[name]).abs().max().item()
            round_drift[name] = max(round_drift[name], drift_image, drift_latents)
        else:
            images[name], latents[name] = image, final["latents"]
        measured = torch.tensor([elapsed, timer.total, cpu], dtype=torch.float64)
        if world > 1:
            # (3,) per rank -> (3,) the slowest rank's pipeline, transformer and CPU seconds
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        wall, in_transformer, cpu = measured.tolist()
        return wall, in_transformer, cpu

    # Interleaved: each round runs every variant once, in an order rotated per round, so drifts of the machine's
    # speed hit all variants alike.
    names = list(bench.variants)
    for round_index in range(bench.warmup + bench.repeats):
        for name in rotated(names, round_index):
            elapsed, in_transformer, cpu = call(name)
            if round_index >= bench.warmup:
                times[name].append(elapsed)
                transformer_times[name].append(in_transformer)
                cpu_times[name].append(cpu)

    return dict(
        rank=rank,
        times=times,
        transformer_times=transformer_times,
        cpu_times=cpu_times,
        stats=stats,
        images=images,
        latents=latents,
        round_drift=round_drift,
        parameters=sum(p.numel() for p in pipe.transformer.parameters()),
        image_tokens=bench.size * bench.size,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def _calls(stats: dict[str, Any]) -> tuple[int, int]:
    """(computed, total) transformer calls over both CFG branches of one pipeline call."""
    computed = sum(len(branch["computed"]) for branch in stats.values())
    skipped = sum(len(branch["skipped"]) for branch in stats.values())
    return computed, computed + skipped


def _fmt_db(value: float) -> str:
    return "inf (identical)" if math.isinf(value) else f"{value:.1f}"


def report(bench: BenchConfig, results: list[dict[str, Any]], wall_s: float) -> None:
    first = results[0]
    parallel = f"Ulysses-{bench.world} SP on {bench.world} gloo processes" if bench.world > 1 else "1 process"
    print(
        f"\nQwenImageSPPipeline, random weights: transformer {bench.layers} layers, {bench.heads} heads x "
        f"{bench.head_dim}, {first['parameters'] / 1e6:.1f} M parameters, fp32; tiny text encoder and VAE; "
        f"{bench.pixels}x{bench.pixels} px = {bench.size}x{bench.size} = {first['image_tokens']} image tokens, "
        f"batch 1, true CFG (scale {CFG_SCALE}, negative prompt), {bench.steps} steps; {parallel} x {bench.threads} "
        f"thread(s); medians of {bench.repeats} interleaved rounds after {bench.warmup} warm-up."
    )

    slowest = ", slowest rank" if bench.world > 1 else ""
    print(f"\nPer-round pipeline times (s{slowest}), wall-clock / CPU time of the process:")
    for name in bench.variants:
        rounds = zip(first["times"][name], first["cpu_times"][name])
        print(f"  {name:<16} " + "  ".join(f"{wall:.2f}/{cpu:.2f}" for wall, cpu in rounds))

    median = {name: statistics.median(first["times"][name]) for name in bench.variants}
    median_cpu = {name: statistics.median(first["cpu_times"][name]) for name in bench.variants}
    median_tf = {name: statistics.median(first["transformer_times"][name]) for name in bench.variants}
    reference_image = first["images"][UNCACHED]
    reference_latents = first["latents"][UNCACHED]

    print(f"\n## TeaCache, {parallel}\n")
    print(
        "| variant | computed / transformer calls | ideal speed-up | pipeline wall (s) | wall speed-up "
        "| pipeline CPU (s) | CPU speed-up | in transformer, wall (s) | transformer speed-up "
        "| PSNR vs uncached (dB) | latents rel. L2 error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in bench.variants:
        calls = 2 * bench.steps
        computed = calls
        if name != UNCACHED:
            computed, calls = _calls(first["stats"][name][0])
        image, latent = first["images"][name], first["latents"][name]
        print(
            f"| {name} | {computed} / {calls} | {calls / computed:.2f}x "
            f"| {median[name]:.2f} | {median[UNCACHED] / median[name]:.2f}x "
            f"| {median_cpu[name]:.2f} | {median_cpu[UNCACHED] / median_cpu[name]:.2f}x "
            f"| {median_tf[name]:.2f} | {median_tf[UNCACHED] / median_tf[name]:.2f}x "
            f"| {_fmt_db(psnr(image, reference_image, peak=1.0))} | {relative_l2(latent, reference_latents):.2e} |"
        )

    # Noise on a shared machine only ever adds time: the fastest round is a second, independent estimate.
    best = {name: min(first["times"][name]) for name in bench.variants}
    best_tf = {name: min(first["transformer_times"][name]) for name in bench.variants}
    print(
        "\nWall speed-up (transformer speed-up) from the fastest round of each variant instead of the median: "
        + ", ".join(
            f"{name} {best[UNCACHED] / best[name]:.2f}x ({best_tf[UNCACHED] / best_tf[name]:.2f}x)"
            for name in bench.variants[1:]
        )
    )
    spread = max(max(first["times"][name]) / best[name] for name in bench.variants)
    if spread > 1.2:
        print(
            f"  The slowest round of a variant took {spread:.2f}x its fastest: the machine was busy. The CPU time "
            "columns are the steadier estimate then (other processes delay this one without adding to its CPU "
            "time); or rerun with more --repeats."
        )

    print("\nComputed steps per CFG branch (the first and last are always computed):")
    for name in bench.variants[1:]:
        stats = first["stats"][name][0]
        for branch in BRANCHES:
            if branch in stats:
                print(f"  {name:<16} {branch:<6} computed {step_ranges(stats[branch]['computed'])}")
    rel = first["stats"][bench.variants[-1]][0].get("cond", {}).get("rel_l1", {}) if bench.thresholds else {}
    if rel:
        values = list(rel.values())
        print(
            f"  indicator rel-L1 per step (cond, {bench.variants[-1]}): min {min(values):.4f}, median "
            f"{statistics.median(values):.4f}, max {max(values):.4f}"
        )

    print("\nChecks:")
    # Every call of a variant, on every rank, must have taken the same decisions.
    for name in bench.variants[1:]:
        lists = {
            (rank, index): {b: (s[b]["computed"], s[b]["skipped"]) for b in s}
            for rank, result in enumerate(results)
            for index, s in enumerate(result["stats"][name])
        }
        distinct = {repr(v) for v in lists.values()}
        where = f"all {len(results)} ranks x {len(first['stats'][name])} calls" if bench.world > 1 else (
            f"all {len(first['stats'][name])} calls"
        )
        verdict = "identical" if len(distinct) == 1 else f"DIFFER ({len(distinct)} distinct)"
        stats = first["stats"][name][0]
        same_branches = len({repr((stats[b]["computed"], stats[b]["skipped"])) for b in BRANCHES if b in stats}) == 1
        print(
            f"  {name:<16} skip lists over {where}: {verdict}; cond and uncond "
            f"{'take the same decisions' if same_branches else 'differ'}"
        )
    drift = max(max(result["round_drift"].values()) for result in results)
    print(f"  repeated calls of a variant (same seed) differ by at most {drift:.2e} (0: deterministic)")
    if bench.world > 1:
        rank_diff = max(
            (result["images"][name] - first["images"][name]).abs().max().item()
            for result in results[1:]
            for name in bench.variants
        )
        print(f"  images of ranks 1..{bench.world - 1} against rank 0: max |diff| {rank_diff:.2e}")

    print(
        "\nNote: the weights are random, so the output is not a picture and the PSNR only measures how far the cached "
        "trajectory drifts from the uncached one on this model; it is no judgement of image quality. The default "
        "coefficients were fitted on the real Qwen-Image, so the skip patterns of a real checkpoint differ too. The "
        "ideal speed-up counts transformer calls only; the text encoder, the VAE decode, and the preprocess, "
        "indicator and postprocess of skipped calls are never skipped, which the transformer columns separate out."
    )
    print(f"\n(total wall time {wall_s:.0f} s)")


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument(
        "--size", type=int, default=defaults.size,
        help=f"image side in image tokens (after 2x2 patching); pixels = {PIXELS_PER_TOKEN} x size",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(defaults.thresholds))
    parser.add_argument("--world", type=int, default=defaults.world, help="processes (Ulysses degree); 1: no SP")
    parser.add_argument(
        "--threads", type=int, default=defaults.threads,
        help="intra-op threads per rank (more than 1 gave 5-10x outliers on a shared 2-core VM, see the README)",
    )
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights and initial noise")
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds for the whole run")
    args = parser.parse_args(argv)
    args.thresholds = tuple(args.thresholds)
    bench = BenchConfig(**{key: getattr(args, key) for key in asdict(defaults) if key != "variants"})
    if bench.world < 1 or bench.repeats < 1 or bench.warmup < 0 or bench.threads < 1:
        parser.error("need --world >= 1, --repeats >= 1, --warmup >= 0, --threads >= 1.")
    if bench.steps < 2 or bench.size < 1 or bench.layers < 1:
        parser.error("need --steps >= 2, --size >= 1, --layers >= 1.")
    thresholds = bench.thresholds
    if any(not math.isfinite(t) or t < 0 for t in thresholds) or len(set(thresholds)) != len(thresholds):
        parser.error(f"--thresholds must be distinct finite numbers >= 0, got {list(bench.thresholds)}.")
    if bench.head_dim % 2 or bench.head_dim < 6:
        parser.error(f"--head-dim must be even and >= 6 (three even RoPE axes), got {bench.head_dim}.")
    if bench.heads % bench.world:
        parser.error(f"Ulysses needs --heads ({bench.heads}) divisible by --world ({bench.world}).")
    return bench


def main(argv: list[str] | None = None) -> None:
    bench = parse_args(argv)
    start = time.perf_counter()
    results = run_distributed(_bench_worker, bench.world, bench, timeout=bench.timeout)
    report(bench, results, time.perf_counter() - start)


if __name__ == "__main__":
    main()
