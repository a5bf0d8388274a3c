"""`diffusers-qwen-sp train-scenes`: train the scene model from scratch on CPU (the recipe of the shipped weights)."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import Any, get_type_hints

from ..scenes.train import SceneTrainingConfig


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train-scenes",
        help="train the scene model from scratch on CPU (the recipe of the shipped weights)",
        description="Train the VAE on procedural scenes, then the transformer by flow matching, and save a "
        "QwenImagePipeline folder; reproducible from --seed. About 45 minutes on 2 CPU cores.",
    )
    parser.add_argument("--output", default="scene-model",
                        help="folder for the trained pipeline (default: scene-model/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs one line per stage)")
    # One option per SceneTrainingConfig field, with its default.
    defaults = SceneTrainingConfig()
    hints = get_type_hints(SceneTrainingConfig)
    for item in fields(SceneTrainingConfig):
        default = getattr(defaults, item.name)
        if hints[item.name] not in (int, float):  # every field is a number today; a new kind needs its own parsing
            raise TypeError(f"SceneTrainingConfig.{item.name}: no command-line parsing for {hints[item.name]}")
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=hints[item.name], default=default,
                            help=f"default: {default}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    r"""Train on every core with the recipe the options give; returns the report of `train_scene_model`."""
    import torch

    from ..scenes.train import train_scene_model

    config = SceneTrainingConfig(**{item.name: getattr(args, item.name) for item in fields(SceneTrainingConfig)})
    torch.set_num_threads(os.cpu_count() or 1)
    report = train_scene_model(args.output, config, progress=not args.no_progress, log=print)
    minutes = sum(report["timings_s"].values()) / 60
    print(f"wrote {args.output} in {minutes:.1f} min; draw with "
          f"`python -m diffusers_qwen_sp generate --model {args.output} --prompt '...'`")
    return report
