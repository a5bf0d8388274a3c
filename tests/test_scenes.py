"""The procedural scenes, their checks, and the small trained model that ships with the package."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import load_file

from diffusers_qwen_sp.cli import main as cli_main
from diffusers_qwen_sp.pipelines import QwenImageSPPipeline
from diffusers_qwen_sp.scenes import (
    RELATIONS,
    SCENE_DEFAULT_STEPS,
    SCENE_NEGATIVE_PROMPT,
    Scene,
    ShapeGroup,
    check_image,
    load_scene_pipeline,
    parse_prompt,
    render_scene,
    sample_scene,
    scene_tokenizer,
    shape_centres,
)
from diffusers_qwen_sp.scenes.grammar import _GROUP_JITTER, _RADIUS, _SHAPE_JITTER
from diffusers_qwen_sp.bench.teacache_curve import CurveSettings, markdown_curve, run_curve
from diffusers_qwen_sp.scenes.train import SceneTrainingConfig, evaluate_scene_pipeline, train_scene_model


def test_every_drawn_scene_passes_its_own_checks() -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        scene = sample_scene(rng)
        assert parse_prompt(scene.prompt) == scene
        check = check_image(render_scene(scene, rng), scene.prompt)
        assert check.faithful, (scene.prompt, check)


def test_every_arrangement_keeps_shapes_apart_and_inside_the_picture() -> None:
    # The layout is what makes counts learnable: shapes of any scene never touch (even at the largest radius and the
    # worst jitter) and never cross the border, and with a relation each group stays in its half.
    largest = _RADIUS[1]  # as a fraction of the picture
    jitter = _GROUP_JITTER + _SHAPE_JITTER  # the most a shape moves on each axis
    for counts in ((1,), (2,), (3,), (1, 1), (1, 2), (2, 1), (2, 2)):
        for relation in (None,) if len(counts) == 1 else RELATIONS:
            groups = tuple(ShapeGroup(n, colour, "circle") for n, colour in zip(counts, ("red", "blue")))
            centres = shape_centres(Scene(groups, "white", relation))
            points = np.array([point for group in centres for point in group])  # (shapes, 2)
            assert len(points) == sum(counts)
            assert (points - largest - jitter >= 0).all() and (points + largest + jitter <= 1).all(), (counts, relation)
            group_of = np.repeat(np.arange(len(counts)), counts)  # (shapes,)
            distance = np.linalg.norm(points[:, None] - points[None], axis=-1)  # (shapes, shapes)
            # the most two shapes can move towards each other: their own jitters, plus the groups' if they differ
            moved = np.where(group_of[:, None] == group_of[None], 2 * _SHAPE_JITTER, 2 * jitter) * math.sqrt(2)
            gap = (distance - moved - 2 * largest)[~np.eye(len(points), dtype=bool)]
            assert (gap > 0.03).all(), (counts, relation, gap.min())  # 2 px apart at least in 64 x 64
            if relation is not None:  # first group on the named side of the second, each in its own half
                axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
                first, second = (np.array(group)[:, axis] for group in centres)
                assert (sign * (first - 0.5) > largest + jitter).all(), (counts, relation)
                assert (sign * (second - 0.5) < -largest - jitter).all(), (counts, relation)


def test_checks_fail_on_the_wrong_picture() -> None:
    rng = np.random.default_rng(0)
    scene = Scene((ShapeGroup(2, "red", "circle"), ShapeGroup(1, "blue", "square")), "yellow", "left of")
    image = render_scene(scene, rng)
    assert scene.prompt == "two red circles left of a blue square on a yellow background"
    assert check_image(image, scene.prompt).faithful
    # one wrong fact at a time: the count, the side, the background, a colour not drawn
    assert not check_image(image, "a red circle left of a blue square on a yellow background").counts
    assert not check_image(image, "two red circles left of two blue squares on a yellow background").counts
    assert not check_image(image, "two red circles right of a blue square on a yellow background").relation
    assert not check_image(image, "two red circles left of a blue square on a white background").background
    wrong_colour = check_image(image, "two green circles left of a blue square on a yellow background")
    assert not wrong_colour.colours and not wrong_colour.no_extra  # green missing, red unexplained
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)  # white everywhere
    assert not check_image(blank, "a red circle on a white background").colours
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not check_image(noise, "a red circle on a white background").colours_and_counts


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a photo of a dog", "is not a scene prompt"),
        ("two red circle on a blue background", "mixes singular and plural"),
        ("a red circle left of a red square on a blue background", "different colours"),
        ("a red circle on a red background", "different colours"),
        ("three red circles left of a blue square on a yellow background", "1 or 2 shapes"),
        ("Two red circles on a blue background", "is not a scene prompt"),
    ],
)
def test_prompts_outside_the_grammar_are_refused(prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


def test_scene_tokenizer_matches_the_pipeline_template() -> None:
    # The pipeline drops the first 34 hidden states as its system prompt: the prefix must be exactly that long so
    # no word of the prompt is dropped and no template token is kept.
    tokenizer = scene_tokenizer()
    template = QwenImagePipeline.__new__(QwenImagePipeline)
    QwenImagePipeline.__init__(template, **{name: None for name in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                    "transformer")})
    prefix = template.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == template.prompt_template_encode_start_idx == 34
    prompt = "two red circles left of a blue square on a yellow background"
    ids = tokenizer(template.prompt_template_encode.format(prompt)).input_ids[34:]
    # one token per word, then the 5 tokens of the template's tail
    assert len(ids) == len(prompt.split()) + 5


@pytest.fixture(scope="module")
def scene_pipe() -> QwenImagePipeline:
    pipe = load_scene_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_draws_the_scene_it_is_asked_for(scene_pipe: QwenImagePipeline) -> None:
    # Over 10 seeds (10 prompts of the grammar, generator seeded by index), dominant colours and shape counts right in
    # at least 8: the bar of issue 7. The shipped weights get 10 of 10 here (and 40 of 40 in the README's samples);
    # the margin absorbs float differences between CPUs, not a weaker model. The side of the relation and the absence
    # of stray colours are held to the same bar.
    evaluation = evaluate_scene_pipeline(scene_pipe, num_seeds=10)
    report = list(zip(evaluation["prompts"], evaluation["checks"]))
    assert sum(check.colours_and_counts for check in evaluation["checks"]) >= 8, report
    assert sum(check.faithful for check in evaluation["checks"]) >= 8, report


def test_our_pipeline_draws_the_same_scene_as_stock(scene_pipe: QwenImagePipeline) -> None:
    ours = load_scene_pipeline(pipeline_cls=QwenImageSPPipeline)
    ours.set_progress_bar_config(disable=True)
    call = dict(prompt="a green triangle above two cyan circles on a black background",
                negative_prompt=SCENE_NEGATIVE_PROMPT, true_cfg_scale=4.0, height=64, width=64,
                num_inference_steps=SCENE_DEFAULT_STEPS, output_type="pt")
    stock = scene_pipe(**call, generator=torch.Generator().manual_seed(3)).images
    mine = ours(**call, generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(mine, stock, atol=1e-5, rtol=0)


def test_generate_defaults_to_the_scene_model(tmp_path, capsys) -> None:
    output = tmp_path / "scene.png"
    torch.set_num_threads(2)  # the CLI chooses, whatever the process had
    assert cli_main(["generate", "--output", str(output)]) == 0
    # it says which threads it used: one for the scene model (64 tokens x 128 wide), and set it
    assert "1 intra-op thread (auto: small work" in capsys.readouterr().out and torch.get_num_threads() == 1
    from PIL import Image

    image = np.asarray(Image.open(output).convert("RGB"))
    assert image.shape == (64, 64, 3)
    # the default prompt, drawn at the default seed
    assert check_image(image, "two red circles left of a blue square on a yellow background").colours_and_counts


def _train_tiny(path, seed: int) -> dict:
    config = SceneTrainingConfig(seed=seed, vae_steps=2, vae_batch_size=4, num_scenes=32, steps=3, batch_size=8,
                                 warmup_steps=1, eval_seeds=1)
    return train_scene_model(path, config, progress=False)


def test_training_is_reproducible_from_its_seed(tmp_path) -> None:
    # A few steps of every stage: the same seed gives the same weights, another seed other weights.
    first, second, other = (_train_tiny(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert first["flow_loss"] == second["flow_loss"] and first["latent_std"] == second["latent_std"]
    for component in ("transformer", "vae"):
        weights_a = load_file(next((tmp_path / "a" / component).glob("*.safetensors")))
        weights_b = load_file(next((tmp_path / "b" / component).glob("*.safetensors")))
        weights_c = load_file(next((tmp_path / "c" / component).glob("*.safetensors")))
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a), component
        assert not all(torch.equal(weights_a[key], weights_c[key]) for key in weights_a), component
    # the result loads with the stock pipeline and remembers how it was made
    assert QwenImagePipeline.from_pretrained(tmp_path / "a").vae.config.latents_std == first["latent_std"]
    assert first["config"]["seed"] == 0 and (tmp_path / "a" / "training.json").is_file()


def test_training_config_is_validated() -> None:
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        SceneTrainingConfig(steps=0)
    with pytest.raises(ValueError, match="unconditional_prob"):
        SceneTrainingConfig(unconditional_prob=1.5)


def test_missing_scene_model_says_how_to_train_one(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train-scenes"):
        load_scene_pipeline(tmp_path)


@pytest.mark.distributed
def test_teacache_curve_takes_the_same_decisions_with_and_without_sp() -> None:
    # bench-teacache in small: 2 prompts, 8 steps, SP off (1 process) and Ulysses 2 (2 gloo processes).
    settings = CurveSettings(prompts=2, steps=8, thresholds=(0.1, 0.8), world=2, timeout=240)
    report = run_curve(settings)
    off, on = report["modes"]["off"], report["modes"]["ulysses2"]
    assert on["max_pixel_diff_vs_off"] <= 1  # 8-bit images of the same fp32 result
    for row_off, row_on in zip(off["rows"], on["rows"]):
        assert row_on["same_skips_as_off"], row_on["variant"]
        assert row_on["computed_calls"] == row_off["computed_calls"]
    uncached, low, high = off["rows"]
    assert math.isinf(uncached["psnr_db"])
    # a higher threshold skips at least as much; at 0.8 some steps are skipped, so the image moves a little
    assert high["computed_calls"] <= low["computed_calls"] and high["computed_calls"] < high["total_calls"]
    assert math.isfinite(high["psnr_db"]) and high["psnr_db"] > 15
    # TeaCache always computes the first and the last step of each branch
    for skips in low["skips"] + high["skips"]:
        assert set(skips) == {"cond", "uncond"}
        assert all(0 not in steps and 7 not in steps for steps in skips.values()), skips
    assert "| ulysses2 | 0.8 |" in markdown_curve(report)
