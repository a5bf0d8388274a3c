"""Samples of the scene model, judged by the grammar's own checks: a PNG grid and the pass rates.

Run:

    python benchmarks/scene_samples.py                       # 40 prompts of the grammar, about 30 s on 2 cores
    python benchmarks/scene_samples.py --prompts 100 --model scene-model/   # a model you trained

Each prompt is drawn from the grammar with `--seed`, generated with the generator seeded by its index (20 steps, true
CFG 4, the defaults of `generate`), and judged by `check_image`. The grid shows each image under a green bar when
colours and counts are right and every other check passes, yellow when colours and counts are right but the relation
or a stray colour is wrong, red otherwise. Writes `benchmarks/results/scenes/samples.png` and `samples.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw  # noqa: E402

from diffusers_qwen_sp.scenes import load_scene_pipeline  # noqa: E402
from diffusers_qwen_sp.scenes.train import evaluate_scene_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="scene-model folder (default: the shipped weights)")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1234, help="draws the prompts (1234: the test's first 10)")
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results" / "scenes"))
    args = parser.parse_args(argv)

    pipe = load_scene_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    evaluation = evaluate_scene_pipeline(pipe, num_seeds=args.prompts, seed=args.seed)
    elapsed = time.perf_counter() - start

    cell, bar = 128, 6
    rows = -(-args.prompts // args.columns)
    grid = Image.new("RGB", (cell * args.columns, (cell + bar) * rows), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, check) in enumerate(zip(evaluation["images"], evaluation["checks"])):
        x, y = (index % args.columns) * cell, (index // args.columns) * (cell + bar)
        grid.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y + bar))
        colour = "#2a2" if check.faithful else ("#db2" if check.colours_and_counts else "#d22")
        draw.rectangle((x, y, x + cell - 1, y + bar - 1), fill=colour)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    grid.save(output / "samples.png")
    report = {
        "prompts": evaluation["prompts"],
        "colours_and_counts": evaluation["colours_and_counts"],
        "faithful": evaluation["faithful"],
        "checks": [
            {"colours_and_counts": check.colours_and_counts, "faithful": check.faithful, "blobs": check.blobs}
            for check in evaluation["checks"]
        ],
        "seconds": elapsed,
    }
    (output / "samples.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.prompts} prompts in {elapsed:.0f} s: colours and counts right {report['colours_and_counts']:.0%}, "
          f"every check {report['faithful']:.0%}; wrote {output / 'samples.png'}")
    for number, (prompt, check) in enumerate(zip(evaluation["prompts"], evaluation["checks"])):
        verdict = "ok" if check.faithful else ("colours+counts ok" if check.colours_and_counts else "WRONG")
        print(f"{number:3d} {verdict:18s} {prompt}  {check.blobs}")
    return report


if __name__ == "__main__":
    main()
