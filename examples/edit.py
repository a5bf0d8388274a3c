"""Image editing with Qwen-Image-Edit-2511 (or 2509 / the first Edit) on one or many GPUs.

One process:          python examples/edit.py --model Qwen/Qwen-Image-Edit-2511 --image in.png --prompt "make it winter"
One node, 4 GPUs:     torchrun --nproc-per-node 4 examples/edit.py --model Qwen/Qwen-Image-Edit-2511 --image in.png \
                          --ulysses-degree 2 --ring-degree 2 --teacache 0.2
                      accelerate launch --num_processes 4 examples/edit.py --model Qwen/Qwen-Image-Edit-2511 \
                          --image a.png --image b.png --cfg-parallel --ulysses-degree 2
Two nodes x 8 GPUs:   torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr $HEAD \
                          --master-port 29500 examples/edit.py --model Qwen/Qwen-Image-Edit-2511 --image in.png \
                          --ulysses-degree 8 --ring-degree 2
Without --model it runs the tiny offline Edit-2511 model on a generated image (random weights, CPU, seconds).
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import Image

from diffusers_qwen_sp import QwenImageEditPlusSPPipeline, QwenImageEditSPPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="e.g. Qwen/Qwen-Image-Edit-2511; default: tiny offline model")
    parser.add_argument("--image", action="append", default=None, help="input image (repeat for several, Plus only)")
    parser.add_argument("--prompt", default="make it winter")
    parser.add_argument("--negative-prompt", default=" ")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--cfg-parallel", action="store_true")
    parser.add_argument("--teacache", type=float, default=None, help="TeaCache threshold, e.g. 0.2")
    parser.add_argument("--output", default="edit.png")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    if args.model is None:
        from diffusers_qwen_sp.testing import build_tiny_pipeline

        pipe = build_tiny_pipeline("qwen_image_edit_2511", pipeline_cls=QwenImageEditPlusSPPipeline)
        images = [Image.new("RGB", (64, 48), (200, 40, 40))]
        extra = dict(height=64, width=64)
        steps = 8
    else:
        # Qwen-Image-Edit (first release) takes one image and its own pipeline class; 2509 / 2511 take several.
        pipeline_cls = QwenImageEditSPPipeline if args.model.rstrip("/").endswith("Qwen-Image-Edit") else QwenImageEditPlusSPPipeline
        pipe = pipeline_cls.from_pretrained(args.model, dtype=torch.bfloat16 if on_gpu else torch.float32)
        if not args.image:
            parser.error("--image is required with --model")
        images = [Image.open(path).convert("RGB") for path in args.image]
        extra, steps = {}, 40

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        pipe.enable_sequence_parallel(
            ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree, cfg_degree=2 if args.cfg_parallel else 1
        )
    pipe.to("cuda" if on_gpu else "cpu")
    if args.teacache is not None:
        pipe.enable_teacache(threshold=args.teacache)

    if args.model is None:
        from diffusers_qwen_sp.testing import small_reference_images

        context = small_reference_images()  # the tiny model: keep the 1024x1024 reference resize small on a CPU
    else:
        import contextlib

        context = contextlib.nullcontext()
    with context:
        result = pipe(
            image=images if len(images) > 1 else images[0],
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            true_cfg_scale=4.0,
            num_inference_steps=args.steps or steps,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            **extra,
        )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        result.images[0].save(args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
