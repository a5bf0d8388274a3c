"""Measure what sharded weights cost and save: parameter bytes per rank and transformer forward time, replicated vs
sharded under the same sequence parallelism, in one run on CPU ([`measure_weight_sharding`]; `benchmarks/
weight_sharding.py` runs it)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..weight_sharding import WeightShardingConfig, apply_weight_sharding, parameter_bytes


@dataclass
class WeightShardingMeasurement:
    r"""
    What [`measure_weight_sharding`] measured: parameter bytes per rank and transformer forward times, replicated vs
    sharded, under the same Ulysses sequence parallelism. A round times each variant once (interleaved, the slowest
    rank's time); times are medians over the rounds, ratios medians of the per-round ratios (robust to a busy machine).
    """

    world_size: int
    model: str
    replicated_bytes: int
    sharded_bytes: int
    block_bytes: int
    forward_s: dict[str, float]
    forward_ratio: dict[str, float]

    @property
    def bytes_ratio(self) -> float:
        """Sharded / replicated parameter bytes per rank."""
        return self.sharded_bytes / self.replicated_bytes

    def to_markdown(self) -> str:
        """A table of the numbers and of the targets (bytes <= 1/world + one block, time <= 1.3x)."""
        mib = 2**20
        bytes_target = self.replicated_bytes / self.world_size + self.block_bytes
        lines = [
            f"Weight sharding at world {self.world_size} (Ulysses {self.world_size}), {self.model}",
            "",
            "| | replicated | sharded | ratio | target |",
            "| --- | --- | --- | --- | --- |",
            f"| parameter MiB per rank | {self.replicated_bytes / mib:.1f} | {self.sharded_bytes / mib:.1f} | "
            f"{self.bytes_ratio:.3f} | <= {bytes_target / mib:.1f} (1/{self.world_size} + one block of "
            f"{self.block_bytes / mib:.1f}): {'met' if self.sharded_bytes <= bytes_target else 'MISSED'} |",
        ]
        for variant, ratio in self.forward_ratio.items():
            target = f"<= 1.3: {'met' if ratio <= 1.3 else 'MISSED'}" if variant == "sharded" else "-"
            lines.append(
                f"| forward s ({variant}) | {self.forward_s['replicated']:.3f} | {self.forward_s[variant]:.3f} | "
                f"{ratio:.3f} | {target} |"
            )
        return "\n".join(lines)


def _measure_worker(rank: int, world_size: int, model_config: dict[str, Any], image_side: int, text_tokens: int,
                    rounds: int) -> dict[str, Any]:
    from ..hooks.sequence_parallel import SequenceParallelConfig, apply_sequence_parallel
    from ..models import QwenImageSPTransformer2DModel

    def build() -> nn.Module:
        torch.manual_seed(0)
        return QwenImageSPTransformer2DModel(**model_config).eval()

    variants = {"replicated": None, "sharded": WeightShardingConfig(), "sharded, no prefetch":
                WeightShardingConfig(prefetch=False)}
    models = {}
    groups = None
    for name, sharding in variants.items():
        model = build()
        runtime = apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=world_size), groups=groups)
        groups = runtime.groups
        if sharding is not None:
            apply_weight_sharding(model, sharding, groups)
        models[name] = model
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, image_side * image_side, model_config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, model_config["joint_attention_dim"], generator=generator),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, image_side, image_side)]],
        return_dict=False,
    )
    times: dict[str, list[float]] = {name: [] for name in models}
    outputs = {}
    with torch.no_grad():
        for round_index in range(rounds + 1):  # round 0 warms up (FSDP2's lazy init, allocator)
            for name, model in models.items():
                dist.barrier()
                start = time.perf_counter()
                outputs[name] = model(**inputs)[0]
                elapsed = time.perf_counter() - start
                if round_index:
                    times[name].append(elapsed)
    blocks = models["sharded"].transformer_blocks
    return {
        "replicated_bytes": parameter_bytes(models["replicated"])[0],
        "sharded_bytes": parameter_bytes(models["sharded"])[0],
        "block_bytes": parameter_bytes(blocks[1] if len(blocks) > 1 else blocks[0])[1],
        "times": times,
        "max_diff": max((outputs[name] - outputs["replicated"]).abs().max().item() for name in outputs),
    }


def measure_weight_sharding(
    world_size: int = 2,
    num_layers: int = 8,
    num_heads: int = 8,
    head_dim: int = 64,
    image_side: int = 32,
    text_tokens: int = 64,
    rounds: int = 5,
    timeout: float = 900.0,
) -> WeightShardingMeasurement:
    r"""
    Measure weight sharding on CPU: `world_size` gloo processes (one thread each) run a random-weight transformer under
    Ulysses `world_size`, replicated, sharded, and sharded without prefetch, interleaved over `rounds` rounds.

    Args:
        world_size (`int`, defaults to `2`): processes (and Ulysses degree; must divide `num_heads`).
        num_layers, num_heads, head_dim (`int`): the model (defaults: 8 blocks, 8 x 64 heads).
        image_side (`int`, defaults to `32`): image tokens per side (32: 1024 image tokens).
        text_tokens (`int`, defaults to `64`): text tokens.
        rounds (`int`, defaults to `5`): timed rounds after one warm-up round.
        timeout (`float`, defaults to `900.0`): seconds for the whole run.

    Returns:
        [`WeightShardingMeasurement`]; `to_markdown()` prints it. Raises a `RuntimeError` if a sharded forward
        differs from the replicated one by more than 1e-4.

    Example:

    ```py
    >>> from diffusers_qwen_sp.weight_sharding import measure_weight_sharding

    >>> print(measure_weight_sharding(world_size=2).to_markdown())
    ```
    """
    from ..distributed import run_distributed

    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 (split over the three rotary axes), got {head_dim}.")
    rope = (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)  # (frame, height, width) axes, summing to head_dim
    model_config = dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=num_heads, joint_attention_dim=num_heads * head_dim, axes_dims_rope=rope,
    )
    per_rank = run_distributed(
        _measure_worker, world_size, model_config, image_side, text_tokens, rounds, timeout=timeout
    )
    max_diff = max(result["max_diff"] for result in per_rank)
    if max_diff > 1e-4:
        raise RuntimeError(f"The sharded forward differs from the replicated one by {max_diff:g} (> 1e-4).")
    # round -> the slowest rank's time, per variant
    rounds_s = {
        name: [max(result["times"][name][index] for result in per_rank) for index in range(rounds)]
        for name in per_rank[0]["times"]
    }
    forward_s = {name: statistics.median(times) for name, times in rounds_s.items()}
    forward_ratio = {
        name: statistics.median(t / r for t, r in zip(times, rounds_s["replicated"]))
        for name, times in rounds_s.items()
        if name != "replicated"
    }
    return WeightShardingMeasurement(
        world_size=world_size,
        model=(
            f"{num_layers} blocks, {num_heads} x {head_dim} heads, {image_side * image_side} image + {text_tokens} "
            f"text tokens, fp32, {rounds} rounds"
        ),
        replicated_bytes=max(result["replicated_bytes"] for result in per_rank),
        sharded_bytes=max(result["sharded_bytes"] for result in per_rank),
        block_bytes=per_rank[0]["block_bytes"],
        forward_s=forward_s,
        forward_ratio=forward_ratio,
    )


__all__ = ["WeightShardingMeasurement", "measure_weight_sharding"]
