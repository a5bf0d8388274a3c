"""Text-to-image with Qwen-Image on one or many GPUs.

One process:          python examples/text_to_image.py --model Qwen/Qwen-Image --prompt "a red fox in the snow"
One node, 4 GPUs:     torchrun --nproc-per-node 4 examples/text_to_image.py --model Qwen/Qwen-Image --ulysses-degree 4
                      accelerate launch --num_processes 4 examples/text_to_image.py --model Qwen/Qwen-Image \
                          --cfg-parallel --ulysses-degree 2 --teacache 0.2
Two nodes x 8 GPUs:   torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr $HEAD \
                          --master-port 29500 examples/text_to_image.py --model Qwen/Qwen-Image \
                          --ulysses-degree 8 --ring-degree 2
Without --model it runs the scene model that ships with the package (64x64 scenes of simple shapes, a few seconds on
a CPU): try --prompt "three green triangles above a purple circle on a white background".
"""

from __future__ import annotations

import argparse
import os

import torch

from diffusers_qwen_sp import QwenImageSPPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="e.g. Qwen/Qwen-Image; default: the shipped scene model")
    parser.add_argument("--prompt", default=None, help="default: a fox for real models, a scene for the scene model")
    parser.add_argument("--negative-prompt", default=" ")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--cfg-parallel", action="store_true")
    parser.add_argument("--teacache", type=float, default=None, help="TeaCache threshold, e.g. 0.2")
    parser.add_argument("--output", default="text_to_image.png")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    teacache: dict = {}
    if args.model is None:
        from diffusers_qwen_sp.scenes import (
            SCENE_DEFAULT_PROMPT,
            SCENE_DEFAULT_STEPS,
            SCENE_IMAGE_SIZE,
            SCENE_TEACACHE_COEFFICIENTS,
            load_scene_pipeline,
        )

        pipe = load_scene_pipeline(pipeline_cls=QwenImageSPPipeline)
        size, steps = SCENE_IMAGE_SIZE, SCENE_DEFAULT_STEPS
        prompt = SCENE_DEFAULT_PROMPT
        teacache["coefficients"] = list(SCENE_TEACACHE_COEFFICIENTS)  # fitted for this model
    else:
        dtype = torch.bfloat16 if on_gpu else torch.float32
        pipe = QwenImageSPPipeline.from_pretrained(args.model, dtype=dtype)
        size, steps, prompt = 1328, 50, "a red fox in the snow, golden hour"

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        # Initialises torch.distributed from the launcher and selects this rank's GPU: call it before .to("cuda").
        pipe.enable_sequence_parallel(
            ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree, cfg_degree=2 if args.cfg_parallel else 1
        )
    pipe.to("cuda" if on_gpu else "cpu")
    if args.teacache is not None:
        pipe.enable_teacache(threshold=args.teacache, **teacache)

    image = pipe(
        prompt=args.prompt or prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=4.0,
        height=args.height or size,
        width=args.width or size,
        num_inference_steps=args.steps or steps,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # rank 0's noise is used everywhere anyway
    ).images[0]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        image.save(args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
