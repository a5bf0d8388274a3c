"""Benchmark: our sequence parallelism against diffusers' own context parallelism, on CPU with gloo.

Run:

    python benchmarks/bench_sequence_parallel.py                      # defaults: about 1 minute on 2 idle cores
    python benchmarks/bench_sequence_parallel.py --tokens 2048 --text-tokens 128 --text-padding 32

On a mid-size random-weight Qwen-Image transformer (fp32, batch 1, a padded text mask) and `--world` gloo processes
with one intra-op thread each, one run measures, interleaved and as medians over `--repeats` after `--warmup`
rounds (so that ratios hold on a noisy machine):

1. the stock diffusers `QwenImageTransformer2DModel` forward in a single process (the reference; it runs on every rank
   at once, so it sees the same memory-bandwidth contention as the parallel variants);
2. our Ulysses and our Ring (`apply_sequence_parallel` on `QwenImageSPTransformer2DModel`);
3. diffusers' own context parallelism, `enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))` on a stock
   transformer with the same weights;
4. the max abs difference of every call of every variant against the reference (the worst over ranks and calls);
5. the bytes each rank sends per forward, measured, against the analytic minimum of each algorithm.

Patches, all inside this process only (the library is not touched):

- diffusers' `ModelMixin._resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is
  `rank % 0` on a machine without an accelerator (ZeroDivisionError). `torch.accelerator.device_count` is made to
  return 1 for the duration of the `enable_parallelism` call: the device becomes `cpu:0` (every CPU rank's device),
  and the device mesh is built on "cpu", i.e. gloo. Nothing else of diffusers' CP is changed.
- Byte counting only (never during timed calls): `diffusers_qwen_sp.distributed.count_communication` counts all of
  our collectives (attention and the `proj_out` gather); diffusers' all-to-all (`attention_dispatch._all_to_all_single`),
  its text-mask all-gather (`torch.distributed.all_gather`) and its output gather (`EquipartitionSharder.unshard`) are
  wrapped to count them.

Counting convention (the one of `count_communication`): bytes a rank sends to other ranks; its own chunk of an
all-to-all is not counted; an all-gather of a chunk of `n` bytes sends `n` to each of the `P - 1` other ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import ContextParallelConfig, QwenImageTransformer2DModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from diffusers_qwen_sp import QwenImageSPTransformer2DModel  # noqa: E402
from diffusers_qwen_sp.distributed import count_communication  # noqa: E402
from diffusers_qwen_sp.hooks import SequenceParallelConfig, apply_sequence_parallel  # noqa: E402
from diffusers_qwen_sp.testing import tiny_transformer_config  # noqa: E402
from diffusers_qwen_sp.testing.multiprocess import run_distributed  # noqa: E402


FP32_BYTES = 4
# Parity bar of the test suite (fp32): a call whose output differs more than this from the reference is "bad".
TOLERANCE = 1e-4
REFERENCE = "single process (stock)"
OURS_ULYSSES = "ours Ulysses"
OURS_RING = "ours Ring"
DIFFUSERS_CP = "diffusers CP Ulysses"


@dataclass(frozen=True)
class BenchConfig:
    layers: int = 4
    heads: int = 8
    head_dim: int = 64
    tokens: int = 1536
    text_tokens: int = 64
    text_padding: int = 16
    batch: int = 1
    world: int = 2
    repeats: int = 7
    warmup: int = 1
    check_calls: int = 4
    timeout: float = 900.0

    @property
    def grid(self) -> tuple[int, int]:
        """(height, width) in patches with height * width == tokens, as square as possible."""
        height = max(d for d in range(1, math.isqrt(self.tokens) + 1) if self.tokens % d == 0)
        return height, self.tokens // height

    def transformer_config(self) -> dict[str, Any]:
        # RoPE axes (frame, height, width) must sum to head_dim; Qwen-Image uses (16, 56, 56) for 128.
        # Every axis must be even (complex pairs).
        frame_axis = max(2, self.head_dim // 8 // 2 * 2)
        side_axis = (self.head_dim - frame_axis) // 4 * 2
        return tiny_transformer_config(
            num_layers=self.layers,
            num_attention_heads=self.heads,
            attention_head_dim=self.head_dim,
            in_channels=64,
            out_channels=16,
            joint_attention_dim=self.heads * self.head_dim,
            axes_dims_rope=(frame_axis, side_axis, self.head_dim - frame_axis - side_axis),
        )


def make_inputs(config: dict[str, Any], bench: BenchConfig) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1234)
    height, width = bench.grid
    mask = torch.ones(bench.batch, bench.text_tokens, dtype=torch.long)
    if bench.text_padding:
        mask[:, bench.text_tokens - bench.text_padding :] = 0  # a prompt shorter than the padded length
    return dict(
        hidden_states=torch.randn(bench.batch, bench.tokens, config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(
            bench.batch, bench.text_tokens, config["joint_attention_dim"], generator=generator
        ),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((bench.batch,), 0.7),
        img_shapes=[[(1, height, width)]] * bench.batch,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Analytic minimum of the bytes one rank sends per forward
# ---------------------------------------------------------------------------------------------------------------------


def analytic_bytes(bench: BenchConfig, out_channels: int) -> dict[str, dict[str, float]]:
    """Per-term minimum bytes one rank sends in one forward, for each algorithm (fp32, S divisible or not)."""
    B, S, T, H, D, L, P = (
        bench.batch, bench.tokens, bench.text_tokens, bench.heads, bench.head_dim, bench.layers, bench.world
    )
    row = B * H * D * FP32_BYTES  # one token's (H, D) row over the batch
    # proj_out: each rank's (B, S/P, C_out) chunk goes to the P - 1 others.
    gather = B * (S / P) * out_channels * FP32_BYTES * (P - 1)
    ulysses = {
        "qkv all-to-all": L * 3 * (S / P) * row * (P - 1) / P,
        "out all-to-all (image)": L * (S / P) * row * (P - 1) / P,
        "text heads gather": L * T * (row / P) * (P - 1),
        "proj_out gather": gather,
    }
    ring = {
        "K/V ring passes": L * (P - 1) * 2 * (S / P) * row,
        "proj_out gather": gather,
    }
    diffusers = {
        # text is split too: Q, K, V, out all-to-alls carry the joint [text, image] chunk of (S + T) / P tokens
        "q,k,v,out all-to-all (joint)": L * 4 * ((S + T) / P) * row * (P - 1) / P,
        # the joint [text, image] bool mask chunk (stock forward casts the text mask to bool): 1 byte per token
        "text-mask all-gather": L * B * ((S + T) / P) * 1 * (P - 1),
        "proj_out gather": gather,
    }
    return {OURS_ULYSSES: ulysses, OURS_RING: ring, DIFFUSERS_CP: diffusers}


FORMULAS = """\
Bytes one rank sends per forward (B batch, S image tokens, T text tokens, H heads, D head dim, L layers, P ranks,
C = patch^2 * out_channels = {C}, fp32 = 4 bytes, row = B*H*D*4):
  proj_out gather (all)     : B*(S/P)*C*4*(P-1)                  each rank's output chunk to the P-1 others
  ours Ulysses, per layer   : 3*(S/P)*row*(P-1)/P                 Q,K,V all-to-all, sequence- -> head-sharded
                            + (S/P)*row*(P-1)/P                   image output all-to-all back
                            + T*(row/P)*(P-1)                     text output: our H/P heads to every other rank
  ours Ring, per layer      : (P-1) * 2*(S/P)*row                 K and V image blocks passed P-1 times
                                                                  (text is replicated: no text traffic)
  diffusers CP Ulysses/layer: 4*((S+T)/P)*row*(P-1)/P             Q,K,V,out all-to-alls of the joint [text, image]
                            + B*((S+T)/P)*1*(P-1)                 all-gather of the joint bool attention-mask chunk
"""


# ---------------------------------------------------------------------------------------------------------------------
# Patches (this process only)
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_accelerator_count() -> Iterator[None]:
    """Make `torch.accelerator.device_count()` at least 1, so diffusers' `rank % device_count()` works on CPU."""
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, original())
    try:
        yield
    finally:
        torch.accelerator.device_count = original


@dataclass
class ByteCounter:
    bytes_sent: int = 0
    calls: int = 0

    def add(self, nbytes: int) -> None:
        self.bytes_sent += int(nbytes)
        self.calls += 1


@contextlib.contextmanager
def patched(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """Replace `owner.name` by `make(owner.name)` inside the block; restore the raw attribute (e.g. a classmethod)."""
    raw = vars(owner)[name]
    setattr(owner, name, make(getattr(owner, name)))
    try:
        yield
    finally:
        setattr(owner, name, raw)


@contextlib.contextmanager
def count_diffusers_cp(world: int) -> Iterator[dict[str, ByteCounter]]:
    """Count the bytes of diffusers' CP collectives (all-to-all, mask all-gather, output gather)."""
    from diffusers.hooks import context_parallel
    from diffusers.models import attention_dispatch

    counters = {name: ByteCounter() for name in ("all_to_all", "mask all_gather", "proj_out gather")}

    def make_all_to_all(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(x: torch.Tensor, group: Any) -> torch.Tensor:
            counters["all_to_all"].add(x.numel() * x.element_size() * (world - 1) // world)
            return original(x, group)

        return wrapped

    def make_all_gather(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(tensor_list: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counters["mask all_gather"].add(tensor.numel() * tensor.element_size() * (world - 1))
            return original(tensor_list, tensor, *args, **kwargs)

        return wrapped

    def make_unshard(original: Any) -> Any:
        def wrapped(cls: type, tensor: torch.Tensor, dim: int, mesh: Any) -> torch.Tensor:
            counters["proj_out gather"].add(tensor.numel() * tensor.element_size() * (world - 1))
            return original(tensor, dim, mesh)  # `original` is already bound to the class

        return classmethod(wrapped)

    with (
        patched(attention_dispatch, "_all_to_all_single", make_all_to_all),
        patched(dist, "all_gather", make_all_gather),
        patched(context_parallel.EquipartitionSharder, "unshard", make_unshard),
    ):
        yield counters


# ---------------------------------------------------------------------------------------------------------------------
# The worker (one per rank)
# ---------------------------------------------------------------------------------------------------------------------


def _max_abs_diff(output: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (output.float() - reference.float()).abs().max().item()
    return diff if math.isfinite(diff) else math.inf  # NaN/inf garbage counts as the worst


def _bench_worker(rank: int, world: int, bench: BenchConfig) -> dict[str, Any]:
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()  # enable_parallelism warns "experimental" on every rank
    # diffusers' CP output gather calls a deprecated functional collective on every forward.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    config = bench.transformer_config()
    torch.manual_seed(0)  # same weights on every rank
    stock = QwenImageTransformer2DModel(**config).eval()
    inputs = make_inputs(config, bench)

    # Ours: two staged transformers sharing the stock weights (no copy), one per algorithm, so no variant re-applies
    # hooks or rebuilds process groups between timed calls.
    ours_ulysses = QwenImageSPTransformer2DModel.from_transformer(stock).eval()
    apply_sequence_parallel(ours_ulysses, SequenceParallelConfig(ulysses_degree=world))
    ours_ring = QwenImageSPTransformer2DModel.from_transformer(stock).eval()
    apply_sequence_parallel(ours_ring, SequenceParallelConfig(ring_degree=world))

    # diffusers CP: a separate stock instance (enable_parallelism changes its processors and hooks), same weights.
    diffusers_cp = QwenImageTransformer2DModel(**config).eval()
    diffusers_cp.load_state_dict(stock.state_dict())
    cp_error = ""
    try:
        with cpu_accelerator_count():
            diffusers_cp.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    except Exception as error:  # noqa: BLE001 - reported as "n/a" with the reason
        cp_error = f"enable_parallelism failed: {type(error).__name__}: {error}"
    # Every rank must agree on whether the CP variant runs, or the collectives would diverge.
    failed = torch.tensor([1 if cp_error else 0])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() and not cp_error:
        cp_error = "enable_parallelism failed on another rank"

    with torch.no_grad():
        reference = stock(**inputs)[0]

    def forward(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model(**inputs)[0]

    variants: dict[str, Callable[[], torch.Tensor]] = {
        REFERENCE: forward(stock),
        OURS_ULYSSES: forward(ours_ulysses),
        OURS_RING: forward(ours_ring),
    }
    if not cp_error:
        variants[DIFFUSERS_CP] = forward(diffusers_cp)

    times: dict[str, list[float]] = {name: [] for name in variants}
    diffs: dict[str, list[float]] = {name: [] for name in variants}
    errors: dict[str, str] = {}
    if cp_error:
        errors[DIFFUSERS_CP] = cp_error

    def call(name: str) -> float:
        """One forward of `name` on every rank; returns its wall time (the slowest rank's)."""
        dist.barrier()  # start together; the barrier is outside the timed window
        start = time.perf_counter()
        try:
            with torch.no_grad():
                output = variants[name]()
            failed_here = 0
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            errors[name] = f"{type(error).__name__}: {error}"
            output, failed_here = None, 1
        elapsed = torch.tensor([time.perf_counter() - start, float(failed_here)], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if elapsed[1].item():
            errors.setdefault(name, "failed on another rank")
            del variants[name]
            return math.nan
        diffs[name].append(_max_abs_diff(output, reference))
        return elapsed[0].item()

    # Interleaved: each round runs every variant once, in an order rotated per round, so drifts of the machine's
    # speed hit all variants alike.
    for round_index in range(bench.warmup + bench.repeats):
        names = list(variants)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name not in variants:
                continue
            elapsed = call(name)
            if round_index >= bench.warmup and math.isfinite(elapsed):
                times[name].append(elapsed)

    # More untimed calls for parity: diffusers' Ulysses was seen to return garbage on random calls.
    for _ in range(bench.check_calls):
        for name in [n for n in variants if n != REFERENCE]:
            call(name)

    # Bytes per forward (untimed, one call each).
    comm: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for name, model in ((OURS_ULYSSES, ours_ulysses), (OURS_RING, ours_ring)):
            if name not in variants:
                continue
            with count_communication() as stats:  # attention collectives and the proj_out gather
                model(**inputs)
            comm[name] = {
                **{f"{op} ({stats.calls[op]} calls)": sent for op, sent in stats.bytes_sent_by_op.items()},
                "total": stats.bytes_sent,
            }
        if DIFFUSERS_CP in variants:
            with count_diffusers_cp(world) as counters:
                diffusers_cp(**inputs)
            comm[DIFFUSERS_CP] = {
                f"{op} ({counter.calls} calls)": counter.bytes_sent for op, counter in counters.items()
            }
            comm[DIFFUSERS_CP]["total"] = sum(counter.bytes_sent for counter in counters.values())

    return dict(
        rank=rank,
        times=times,
        diffs=diffs,
        errors=errors,
        comm=comm,
        parameters=sum(p.numel() for p in stock.parameters()),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def _mib_and_bytes(nbytes: float) -> str:
    return f"{_mib(nbytes):>11} ({nbytes:>12,.0f} B)"


def _fmt_diff(value: float) -> str:
    return "inf/nan" if not math.isfinite(value) else f"{value:.2e}"


def report(bench: BenchConfig, results: list[dict[str, Any]], wall_s: float) -> None:
    config = bench.transformer_config()
    first = results[0]
    height, width = bench.grid
    print(
        f"\nQwen-Image transformer, random weights: {bench.layers} layers, {bench.heads} heads x {bench.head_dim}, "
        f"{first['parameters'] / 1e6:.1f} M parameters, fp32, batch {bench.batch}; {bench.tokens} image tokens "
        f"({height}x{width} patches), {bench.text_tokens} text tokens of which {bench.text_padding} masked; "
        f"{bench.world} gloo processes x 1 thread; medians of {bench.repeats} interleaved rounds after "
        f"{bench.warmup} warm-up; {bench.check_calls} extra untimed parity calls per parallel variant."
    )
    names = [REFERENCE, OURS_ULYSSES, OURS_RING, DIFFUSERS_CP]
    median = {
        name: statistics.median(first["times"][name]) if first["times"].get(name) else math.nan for name in names
    }
    worst = {}
    calls = {}
    bad = {}
    for name in names:
        per_rank = [r["diffs"].get(name, []) for r in results]
        all_diffs = [d for diffs in per_rank for d in diffs]
        worst[name] = max(all_diffs) if all_diffs else math.nan
        calls[name] = len(per_rank[0])
        bad[name] = sum(1 for d in all_diffs if not d <= TOLERANCE)
    errors = {name: msg for r in results for name, msg in r["errors"].items()}

    print("\nPer-round times (s, slowest rank):")
    for name in names:
        if first["times"].get(name):
            print(f"  {name:<24} " + " ".join(f"{t:.3f}" for t in first["times"][name]))
    for name, message in errors.items():
        print(f"  {name}: n/a ({message.splitlines()[0][:300]})")

    ref = median[REFERENCE]
    cp = median[DIFFUSERS_CP]
    print("\nTime ratios (lower is faster):")
    for name in (OURS_ULYSSES, OURS_RING, DIFFUSERS_CP):
        if math.isfinite(median[name]):
            print(f"  {name:<24} / single process = {median[name] / ref:.3f}  (speed-up {ref / median[name]:.2f}x)")
    if math.isfinite(cp) and math.isfinite(median[OURS_ULYSSES]):
        print(f"  ours Ulysses / diffusers CP Ulysses = {median[OURS_ULYSSES] / cp:.3f}")
    else:
        print(f"  ours Ulysses / diffusers CP Ulysses = n/a ({errors.get(DIFFUSERS_CP, 'not measured')})")

    print("\n" + FORMULAS.format(C=config["patch_size"] ** 2 * config["out_channels"]))
    minimum = analytic_bytes(bench, config["patch_size"] ** 2 * config["out_channels"])
    print("Communication per forward per rank (measured on rank 0; analytic terms at exact S/P):")
    ratio = {}
    for name in (OURS_ULYSSES, OURS_RING, DIFFUSERS_CP):
        measured = first["comm"].get(name)
        if measured is None:
            continue
        total_min = sum(minimum[name].values())
        ratio[name] = measured["total"] / total_min
        print(f"  {name}:")
        for term, value in minimum[name].items():
            print(f"    analytic  {term:<32} {_mib_and_bytes(value)}")
        for term, value in measured.items():
            if term != "total":
                print(f"    measured  {term:<32} {_mib_and_bytes(value)}")
        print(
            f"    total: measured {_mib(measured['total'])} ({measured['total']} B), analytic minimum "
            f"{_mib(total_min)}, measured/minimum = {ratio[name]:.4f}"
        )
        if any(r["comm"].get(name, {}).get("total") != measured["total"] for r in results):
            print(f"    (per rank totals differ: {[r['comm'].get(name, {}).get('total') for r in results]})")

    print("\n## Results\n")
    print("| variant | median forward (s) | vs single process | vs diffusers CP Ulysses | bytes sent / forward / rank "
          "| analytic minimum | measured / minimum | worst max abs diff vs reference | calls > 1e-4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        if not math.isfinite(median[name]):
            reason = errors.get(name, "not measured")
            print(f"| {name} | n/a ({reason.splitlines()[0][:120]}) | | | | | | | |")
            continue
        vs_ref = f"{median[name] / ref:.3f} ({ref / median[name]:.2f}x)"
        vs_cp = f"{median[name] / cp:.3f}" if math.isfinite(cp) else "n/a"
        measured = first["comm"].get(name)
        bytes_cell = _mib(measured["total"]) if measured else "0"
        min_cell = _mib(sum(minimum[name].values())) if name in minimum else "0"
        ratio_cell = f"{ratio[name]:.4f}" if name in ratio else "-"
        checks = calls[name] * len(results)
        print(
            f"| {name} | {median[name]:.3f} | {vs_ref} | {vs_cp} | {bytes_cell} | {min_cell} | {ratio_cell} "
            f"| {_fmt_diff(worst[name])} | {bad[name]} of {checks} |"
        )
    print(f"\n(total wall time {wall_s:.0f} s)")


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="image tokens (after 2x2 patching)")
    parser.add_argument("--text-tokens", type=int, default=defaults.text_tokens)
    parser.add_argument("--text-padding", type=int, default=defaults.text_padding, help="masked text tokens")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--world", type=int, default=defaults.world, help="processes (the SP degree)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds first")
    parser.add_argument("--check-calls", type=int, default=defaults.check_calls, help="extra untimed parity calls")
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds for the whole run")
    args = parser.parse_args(argv)
    bench = BenchConfig(**{key: getattr(args, key) for key in asdict(defaults)})
    if not 0 <= bench.text_padding < bench.text_tokens:
        parser.error(f"--text-padding must be in [0, --text-tokens), got {bench.text_padding}.")
    if bench.world < 2 or bench.repeats < 1 or bench.warmup < 0 or bench.check_calls < 0:
        parser.error("need --world >= 2, --repeats >= 1, --warmup >= 0, --check-calls >= 0.")
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
