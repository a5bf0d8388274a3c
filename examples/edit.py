"""Image editing with Qwen-Image-Edit-2511 (or 2509 / the first Edit) on one or many GPUs.

One process:          python examples/edit.py --model Qwen/Qwen-Image-Edit-2511 --image in.png --prompt "make it winter"
One node, 4 GPUs:     torchrun --nproc-per-node 4 examples/edit.py --model Qwen/Qwen-Image-Edit-2511 --image in.png \
                          --ulysses-degree 2 --ring-degree 2 --teacache 0.2
                      accelerate launch --num_processes 4 examples/edit.py --model Qwen/Qwen-Image-Edit-2511 \
                          --image a.png --image b.png --cfg-parallel --ulysses-degree 2
Two nodes x 8 GPUs:   torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr $HEAD \
                          --master-port 29500 examples/edit.py --model Qwen/Qwen-Image-Edit-2511 --image in.png \
                          --ulysses-degree 8 --ring-degree 2
--model and --image are required: no edit model ships with the package (the shipped scene model is text-to-image only;
see examples/text_to_image.py).
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import Image

from diffusers_qwen_sp import QwenImageEditPlusSPPipeline, QwenImageEditSPPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local folder, e.g. Qwen/Qwen-Image-Edit-2511")
    parser.add_argument("--image", action="append", required=True, help="input image (repeat for several, Plus only)")
    parser.add_argument("--prompt", default="make it winter")
    parser.add_argument("--negative-prompt", default=" ")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--cfg-parallel", action="store_true")
    parser.add_argument("--teacache", type=float, default=None, help="TeaCache threshold, e.g. 0.2")
    parser.add_argument("--output", default="edit.png")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    # Qwen-Image-Edit (first release) takes one image and its own pipeline class; 2509 / 2511 take several.
    first_edit = args.model.rstrip("/").endswith("Qwen-Image-Edit")
    pipeline_cls = QwenImageEditSPPipeline if first_edit else QwenImageEditPlusSPPipeline
    pipe = pipeline_cls.from_pretrained(args.model, dtype=torch.bfloat16 if on_gpu else torch.float32)
    images = [Image.open(path).convert("RGB") for path in args.image]

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        pipe.enable_sequence_parallel(
            ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree, cfg_degree=2 if args.cfg_parallel else 1
        )
    pipe.to("cuda" if on_gpu else "cpu")
    if args.teacache is not None:
        pipe.enable_teacache(threshold=args.teacache)

    result = pipe(
        image=images if len(images) > 1 else images[0],
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=4.0,
        num_inference_steps=args.steps,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # rank 0's noise is used everywhere anyway
    )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        result.images[0].save(args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
