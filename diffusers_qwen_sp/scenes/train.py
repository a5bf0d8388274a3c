"""Train the scene model from scratch on CPU: the VAE for reconstruction, then the transformer by flow matching.

`python -m diffusers_qwen_sp train-scenes --output DIR` runs [`train_scene_model`]; the defaults are the recipe of the
weights that ship with the package and finish in well under an hour on 2 CPU cores.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from tqdm.auto import tqdm

from .grammar import check_image, render_scene, sample_scene, scene_prompts
from .model import (
    SCENE_DEFAULT_STEPS,
    SCENE_IMAGE_SIZE,
    SCENE_NEGATIVE_PROMPT,
    build_scene_components,
    generate_scene_image,
)


__all__ = [
    "SceneTrainingConfig",
    "evaluate_scene_pipeline",
    "train_scene_model",
]


@dataclass
class SceneTrainingConfig:
    r"""
    The training recipe. The defaults made the shipped weights.

    Args:
        seed (`int`, defaults to `0`):
            Seeds the initial weights, the scenes and the noise; the same seed reproduces the same run (up to the
            float reductions of the CPU kernels).
        vae_steps (`int`, defaults to `1500`), vae_batch_size (`int`, defaults to `16`), vae_lr (`float`, defaults to `1e-3`):
            VAE training on freshly drawn scenes: L1 + MSE reconstruction of the posterior mean plus `kl_weight` x KL.
        vae_crop (`int`, defaults to `32`):
            The VAE trains on random `vae_crop`-pixel crops (multiples of 4, the VAE's factor): it is convolutional, so
            4x cheaper steps buy 4x more of them, which this architecture needs (its loss plateaus for the first few
            hundred steps).
        kl_weight (`float`, defaults to `1e-6`)
        num_scenes (`int`, defaults to `16384`):
            Scenes encoded once by the trained VAE (and their prompts by the frozen text encoder) for the transformer.
        steps (`int`, defaults to `5500`), batch_size (`int`, defaults to `64`), lr (`float`, defaults to `8e-4`):
            Transformer training: AdamW, linear warm-up over `warmup_steps`, cosine decay to 5 % of `lr`.
        warmup_steps (`int`, defaults to `200`)
        ema_decay (`float`, defaults to `0.999`):
            The saved transformer is this exponential moving average of the trained one.
        unconditional_prob (`float`, defaults to `0.1`):
            Share of samples trained on the negative prompt `" "` instead of their own, for true CFG.
        eval_seeds (`int`, defaults to `10`):
            Scenes drawn (with their own seeds) to judge the result with the grammar's checks at the end.
    """

    seed: int = 0
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_crop: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    num_scenes: int = 16384
    steps: int = 5500
    batch_size: int = 64
    lr: float = 8e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    unconditional_prob: float = 0.1
    eval_seeds: int = 10

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch_size", "vae_crop", "num_scenes", "steps", "batch_size", "eval_seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vae_crop % 4 or self.vae_crop > SCENE_IMAGE_SIZE:
            raise ValueError(f"vae_crop must be a multiple of 4 up to {SCENE_IMAGE_SIZE}, got {self.vae_crop!r}")
        for name in ("vae_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive learning rate, got {getattr(self, name)!r}")
        if self.kl_weight < 0 or self.warmup_steps < 0:
            raise ValueError(f"kl_weight and warmup_steps must be >= 0, got {self.kl_weight!r}, {self.warmup_steps!r}")
        if not 0 <= self.unconditional_prob < 1:
            raise ValueError(f"unconditional_prob must be in [0, 1), got {self.unconditional_prob!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")


def _images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    # N x (H, W, 3) uint8 -> (N, 3, 1, H, W) in [-1, 1], the VAE's video layout with one frame
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).unsqueeze(2)


def _draw(rng: np.random.Generator, count: int) -> tuple[list[str], torch.Tensor]:
    scenes = [sample_scene(rng) for _ in range(count)]
    images = [render_scene(scene, rng, SCENE_IMAGE_SIZE) for scene in scenes]
    return [scene.prompt for scene in scenes], _images_to_tensor(images)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _train_vae(
    vae: torch.nn.Module, config: SceneTrainingConfig, rng: np.random.Generator, bar: Any, log: Callable[[str], None]
) -> float:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config.vae_steps // 20 + 1, config.vae_steps)
    )
    running = None
    crop = config.vae_crop
    for step in range(config.vae_steps):
        _, pixels = _draw(rng, config.vae_batch_size)  # (B, 3, 1, H, W)
        top, left = rng.integers(0, (SCENE_IMAGE_SIZE - crop) // 4 + 1, size=2) * 4  # on the latent grid
        pixels = pixels[..., top : top + crop, left : left + crop]  # (B, 3, 1, crop, crop)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)
        loss = loss + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix_str(f"vae loss {running:.4f}")
        bar.update(1)
        if (step + 1) % 250 == 0:
            log(f"VAE step {step + 1}/{config.vae_steps}: loss {running:.4f}")
    vae.eval()
    return float(running)


@torch.no_grad()
def _encode_scenes(
    pipe: QwenImagePipeline, config: SceneTrainingConfig, rng: np.random.Generator, bar: Any
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, float]]:
    chunk = 256
    latents, prompts, psnr = [], [], []
    for start in range(0, config.num_scenes, chunk):
        batch_prompts, pixels = _draw(rng, min(chunk, config.num_scenes - start))
        mean = pipe.vae.encode(pixels).latent_dist.mode()  # (B, C, 1, h, w)
        if start == 0:  # reconstruction quality of the trained VAE, on scenes it never saw
            reconstruction = pipe.vae.decode(mean[:64]).sample.clamp(-1, 1)
            mse = (reconstruction - pixels[:64]).pow(2).mean(dim=(1, 2, 3, 4)) / 4  # on a [0, 1] scale
            psnr.append(float((10 * torch.log10(1 / mse)).mean()))
        latents.append(mean)
        prompts.extend(batch_prompts)
        bar.update(len(batch_prompts))
    latents = torch.cat(latents)  # (N, C, 1, h, w)
    channel_mean = latents.mean(dim=(0, 2, 3, 4))
    channel_std = latents.std(dim=(0, 2, 3, 4))
    # The pipeline decodes `latents * std + mean`: store the statistics in the VAE config, train on normalised ones.
    pipe.vae.register_to_config(latents_mean=channel_mean.tolist(), latents_std=channel_std.tolist())
    latents = (latents - channel_mean.view(1, -1, 1, 1, 1)) / channel_std.view(1, -1, 1, 1, 1)
    batch, channels, _, height, width = latents.shape
    packed = QwenImagePipeline._pack_latents(latents, batch, channels, height, width)  # (N, h/2 * w/2, 4C)

    unique = sorted(set(prompts) | {SCENE_NEGATIVE_PROMPT})
    table: dict[str, torch.Tensor] = {}
    for start in range(0, len(unique), chunk):
        texts = unique[start : start + chunk]
        embeds, mask = pipe.encode_prompt(texts, device=torch.device("cpu"))  # (B, L, D), (B, L) or None
        lengths = mask.sum(dim=1).tolist() if mask is not None else [embeds.shape[1]] * len(texts)
        for text, embed, length in zip(texts, embeds, lengths):
            table[text] = embed[: int(length)].clone()
    embeddings = [table[prompt] for prompt in prompts]
    embeddings.append(table[SCENE_NEGATIVE_PROMPT])  # last entry: the unconditional prompt
    stats = {"vae_psnr_db": psnr[0], "latent_mean": channel_mean.tolist(), "latent_std": channel_std.tolist()}
    return packed, embeddings, stats


def _collate(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(embed.shape[0] for embed in embeddings)
    batch = torch.zeros(len(embeddings), length, embeddings[0].shape[1])  # (B, L, D), right-padded
    mask = torch.zeros(len(embeddings), length, dtype=torch.long)  # (B, L)
    for row, embed in enumerate(embeddings):
        batch[row, : embed.shape[0]] = embed
        mask[row, : embed.shape[0]] = 1
    return batch, mask


def _train_transformer(
    pipe: QwenImagePipeline,
    packed: torch.Tensor,
    embeddings: list[torch.Tensor],
    config: SceneTrainingConfig,
    bar: Any,
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, float]:
    transformer = pipe.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config.warmup_steps, config.steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    num_scenes, tokens, _ = packed.shape
    side = int(math.isqrt(tokens))  # (side x side) latent patches
    scheduler_config = pipe.scheduler.config
    # The sigmas the pipeline samples at for this image size: the same exponential shift as at inference.
    shift = math.exp(
        calculate_shift(
            tokens,
            scheduler_config.get("base_image_seq_len", 256),
            scheduler_config.get("max_image_seq_len", 4096),
            scheduler_config.get("base_shift", 0.5),
            scheduler_config.get("max_shift", 1.15),
        )
    )
    unconditional = len(embeddings) - 1
    running = None
    for step in range(config.steps):
        index = torch.randint(num_scenes, (config.batch_size,), generator=generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.unconditional_prob
        text, mask = _collate([embeddings[unconditional if d else i] for i, d in zip(index.tolist(), drop.tolist())])
        clean = packed[index]  # (B, S, 4C)
        noise = torch.randn(clean.shape, generator=generator)
        u = torch.rand(config.batch_size, generator=generator)
        sigma = shift * u / (1 + (shift - 1) * u)  # (B,)
        noisy = (1 - sigma.view(-1, 1, 1)) * clean + sigma.view(-1, 1, 1) * noise
        prediction = transformer(
            hidden_states=noisy,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=[[(1, side, side)]] * config.batch_size,
            return_dict=False,
        )[0]
        loss = F.mse_loss(prediction, noise - clean)  # flow matching: velocity from data to noise
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, weight in zip(ema.parameters(), transformer.parameters()):
                average.lerp_(weight, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix_str(f"flow loss {running:.4f}")
        bar.update(1)
        if (step + 1) % 500 == 0:
            log(f"transformer step {step + 1}/{config.steps}: loss {running:.4f}")
    return ema, float(running)


@torch.no_grad()
def evaluate_scene_pipeline(
    pipe: Any,
    num_seeds: int = 10,
    seed: int = 1234,
    num_inference_steps: int = SCENE_DEFAULT_STEPS,
    true_cfg_scale: float = 4.0,
) -> dict[str, Any]:
    r"""
    Draw `num_seeds` prompts of the grammar, generate each with [`generate_scene_image`] (generator seeded by its
    index) and judge the images with [`check_image`].

    Args:
        pipe (`QwenImagePipeline`):
            The scene model (ours or stock).
        num_seeds (`int`, defaults to `10`), seed (`int`, defaults to `1234`):
            How many prompts, and the seed that draws them ([`scene_prompts`]).
        num_inference_steps (`int`, defaults to `SCENE_DEFAULT_STEPS`), true_cfg_scale (`float`, defaults to `4.0`)

    Returns:
        `dict`: `prompts`, `checks` (one [`SceneCheck`] per prompt), `colours_and_counts` and `faithful` (fractions of
        prompts that pass), and `images` (uint8 arrays).
    """
    prompts = scene_prompts(num_seeds, seed)
    images = [
        generate_scene_image(pipe, prompt, index, num_inference_steps, true_cfg_scale)
        for index, prompt in enumerate(prompts)
    ]
    checks = [check_image(image, prompt) for image, prompt in zip(images, prompts)]
    return {
        "prompts": prompts,
        "checks": checks,
        "colours_and_counts": sum(check.colours_and_counts for check in checks) / len(checks),
        "faithful": sum(check.faithful for check in checks) / len(checks),
        "images": images,
    }


def train_scene_model(
    output_dir: str | os.PathLike,
    config: SceneTrainingConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    r"""
    Train the scene model from scratch and save it as a `QwenImagePipeline` folder (safetensors, float16 weights).

    Stages: the VAE on freshly drawn scenes; then `num_scenes` scenes are encoded once (latents by the VAE, prompts by
    the frozen text encoder) and the transformer learns by flow matching on them, with an EMA of its weights kept;
    finally the saved pipeline is judged on `eval_seeds` scenes of the grammar.

    Args:
        output_dir (`str` or `os.PathLike`):
            Where to write the pipeline (plus `training.json` with the recipe and the measurements).
        config ([`SceneTrainingConfig`], *optional*):
            The recipe; defaults to the one of the shipped weights.
        progress (`bool`, defaults to `True`):
            Show a progress bar over all stages.
        log (`Callable[[str], None]`, *optional*):
            Receives one line per finished stage.

    Returns:
        `dict`: the contents of `training.json`.
    """
    config = config or SceneTrainingConfig()
    log = log or (lambda line: None)
    output_dir = Path(output_dir)
    # Every random draw below takes `rng` or a seeded generator; nothing reads (or changes) the global RNG.
    rng = np.random.default_rng(config.seed)
    components = build_scene_components(seed=config.seed)
    components["text_encoder"].requires_grad_(False)
    pipe = QwenImagePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    timings: dict[str, float] = {}
    total = config.vae_steps + config.num_scenes + config.steps
    with tqdm(total=total, desc="train-scenes", disable=not progress, unit="it") as bar:
        start = time.perf_counter()
        bar.set_description("VAE")
        vae_loss = _train_vae(pipe.vae, config, rng, bar, log)
        timings["vae_s"] = time.perf_counter() - start
        log(f"VAE: {config.vae_steps} steps in {timings['vae_s']:.0f} s, loss {vae_loss:.4f}")

        start = time.perf_counter()
        bar.set_description("encode")
        pipe.vae.requires_grad_(False)
        packed, embeddings, stats = _encode_scenes(pipe, config, rng, bar)
        timings["encode_s"] = time.perf_counter() - start
        log(f"encoded {config.num_scenes} scenes in {timings['encode_s']:.0f} s; VAE PSNR {stats['vae_psnr_db']:.1f} dB")

        start = time.perf_counter()
        bar.set_description("transformer")
        ema, flow_loss = _train_transformer(pipe, packed, embeddings, config, bar, log)
        timings["transformer_s"] = time.perf_counter() - start
        log(f"transformer: {config.steps} steps in {timings['transformer_s']:.0f} s, loss {flow_loss:.4f}")

    pipe.transformer = ema
    # The transformer and the VAE in float16 halve the download; the text encoder stays float32 (0.7 MB) so that
    # inference sees exactly the prompt embeddings the transformer was trained on.
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    # Judge what was saved: reload it as a user would.
    saved = QwenImagePipeline.from_pretrained(output_dir, dtype=torch.float32)
    saved.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    evaluation = evaluate_scene_pipeline(saved, num_seeds=config.eval_seeds)
    timings["eval_s"] = time.perf_counter() - start
    report = {
        "config": asdict(config),
        "vae_loss": vae_loss,
        "flow_loss": flow_loss,
        **stats,
        "timings_s": timings,
        "eval": {
            "prompts": evaluation["prompts"],
            "colours_and_counts": evaluation["colours_and_counts"],
            "faithful": evaluation["faithful"],
            "passed": [check.colours_and_counts for check in evaluation["checks"]],
        },
    }
    (output_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(
        f"eval over {config.eval_seeds} seeds: colours and counts right {evaluation['colours_and_counts']:.0%}, "
        f"every check {evaluation['faithful']:.0%}"
    )
    return report
