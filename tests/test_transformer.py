"""The staged transformer against diffusers' stock QwenImageTransformer2DModel (fp32).

Tolerance: outputs must be bit-identical (max abs diff 0) — the staged forward runs the same ops in the same order.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

from diffusers_qwen_sp import QwenImageSPTransformer2DModel
from diffusers_qwen_sp.testing.tiny import tiny_transformer_config


def _stock_and_staged(**config):
    torch.manual_seed(0)
    stock = QwenImageTransformer2DModel(**config).eval()
    return stock, QwenImageSPTransformer2DModel.from_transformer(stock)


def _inputs(config, img_shapes, batch=2, text_len=9, pad=(0, 3), seed=1):
    generator = torch.Generator().manual_seed(seed)
    seq = sum(f * h * w for f, h, w in img_shapes)
    hidden = torch.randn(batch, seq, config["in_channels"], generator=generator)
    text = torch.randn(batch, text_len, config["joint_attention_dim"], generator=generator)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    for b, p in enumerate(pad[:batch]):
        if p:
            mask[b, text_len - p :] = 0
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.7, 0.3][:batch]),
        img_shapes=[list(img_shapes)] * batch,
        return_dict=False,
    )


CASES = {
    # name: (config overrides, img_shapes per sample, extra forward kwargs)
    "plain": ({}, [(1, 6, 5)], {}),
    "plain_no_mask": ({}, [(1, 4, 4)], {"encoder_hidden_states_mask": None}),
    "edit_multi_image": ({}, [(1, 4, 4), (1, 3, 5), (1, 2, 2)], {}),
    "zero_cond_t": ({"zero_cond_t": True}, [(1, 4, 4), (1, 3, 5)], {}),
    "layered": (
        {"use_additional_t_cond": True, "use_layer3d_rope": True},
        [(1, 4, 4), (1, 4, 4), (1, 4, 4)],
        {"additional_t_cond": torch.tensor([0, 1])},
    ),
    "guidance_embeds_config": ({"guidance_embeds": True}, [(1, 4, 6)], {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_stock(name):
    overrides, img_shapes, extra = CASES[name]
    config = tiny_transformer_config(**overrides)
    stock, staged = _stock_and_staged(**config)
    kwargs = {**_inputs(config, img_shapes), **extra}
    with torch.no_grad():
        expected = stock(**kwargs)[0]
        for _ in range(2):  # repeated calls: no state may leak between forwards
            actual = staged(**kwargs)[0]
            assert actual.shape == expected.shape
            assert torch.equal(actual, expected), (actual - expected).abs().max()


def test_batch_of_three_and_controlnet_residuals():
    config = tiny_transformer_config(num_layers=3)
    stock, staged = _stock_and_staged(**config)
    kwargs = _inputs(config, [(1, 4, 5)], batch=2)
    generator = torch.Generator().manual_seed(5)
    # 2 controlnet samples for 3 blocks: interval ceil(3/2) = 2, blocks 0,1 take sample 0 and block 2 sample 1.
    residuals = [torch.randn(2, 20, config["num_attention_heads"] * config["attention_head_dim"], generator=generator) for _ in range(2)]
    with torch.no_grad():
        expected = stock(**kwargs, controlnet_block_samples=residuals)[0]
        actual = staged(**kwargs, controlnet_block_samples=residuals)[0]
        assert torch.equal(actual, expected)
        assert not torch.equal(actual, staged(**kwargs)[0])  # the residuals do change the output

    kwargs3 = _inputs(config, [(1, 3, 3)], batch=1)
    kwargs3 = {k: (torch.cat([v] * 3) if isinstance(v, torch.Tensor) else v) for k, v in kwargs3.items()}
    kwargs3["img_shapes"] = kwargs3["img_shapes"] * 3
    with torch.no_grad():
        assert torch.equal(staged(**kwargs3)[0], stock(**kwargs3)[0])


def test_guidance_is_rejected_with_a_clear_error():
    config = tiny_transformer_config(guidance_embeds=True)
    stock, staged = _stock_and_staged(**config)
    kwargs = _inputs(config, [(1, 4, 4)])
    guidance = torch.full((2,), 4.0)
    with pytest.raises(TypeError):  # the stock forward's latent bug: 4 arguments to a 3-argument embedder
        stock(**kwargs, guidance=guidance)
    with pytest.raises(ValueError, match="guidance"):
        staged(**kwargs, guidance=guidance)


def test_stages_expose_what_the_hooks_need():
    config = tiny_transformer_config(zero_cond_t=True)
    _, staged = _stock_and_staged(**config)
    for stage in ("image_rope_prepare", "modulate_index_prepare", "blocks_stage", "image_output"):
        assert list(getattr(staged, stage).parameters()) == [], stage
    timestep, index = staged.modulate_index_prepare(torch.tensor([0.5, 0.25]), [[(1, 2, 2), (1, 1, 3)]] * 2)
    assert timestep.tolist() == [0.5, 0.25, 0.0, 0.0]
    # target 2*2 = 4 tokens at index 0, reference 1*3 = 3 tokens at index 1
    assert index.tolist() == [[0, 0, 0, 0, 1, 1, 1]] * 2
    hidden = torch.randn(2, 7, 8)
    out, image_freqs, text_freqs, layout = staged.image_rope_prepare(hidden, [[(1, 2, 2), (1, 1, 3)]] * 2, 5)
    assert out is hidden and image_freqs.shape[0] == 7 and text_freqs.shape[0] == 5
    # unsharded: one chunk of all 7 tokens, no padding
    assert (layout.start, layout.local_len, layout.padded_len, layout.valid_len, layout.seq_len) == (0, 7, 7, 7, 7)
    assert not layout.is_sharded

    plain = QwenImageSPTransformer2DModel(**tiny_transformer_config())
    timestep, index = plain.modulate_index_prepare(torch.tensor([0.5]), [[(1, 2, 2)]])
    assert index is None and timestep.tolist() == [0.5]


def test_same_state_dict_and_no_weight_copy():
    config = tiny_transformer_config()
    stock, staged = _stock_and_staged(**config)
    stock_sd, staged_sd = stock.state_dict(), staged.state_dict()
    assert list(stock_sd) == list(staged_sd)
    for key, tensor in stock_sd.items():
        assert staged_sd[key].data_ptr() == tensor.data_ptr(), key
    assert dict(staged.config) == dict(stock.config) or {
        k: v for k, v in staged.config.items() if not k.startswith("_")
    } == {k: v for k, v in stock.config.items() if not k.startswith("_")}
    assert QwenImageSPTransformer2DModel.from_transformer(staged) is staged


def test_from_pretrained_loads_a_stock_checkpoint(tmp_path):
    config = tiny_transformer_config(zero_cond_t=True)
    stock, _ = _stock_and_staged(**config)
    stock.save_pretrained(tmp_path / "transformer")
    loaded = QwenImageSPTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer").eval()
    kwargs = _inputs(config, [(1, 4, 4), (1, 2, 3)])
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0], stock(**kwargs)[0])
    # And the other way: a staged model saves a checkpoint stock diffusers loads.
    loaded.save_pretrained(tmp_path / "staged")
    back = QwenImageTransformer2DModel.from_pretrained(tmp_path / "staged").eval()
    with torch.no_grad():
        assert torch.equal(back(**kwargs)[0], stock(**kwargs)[0])


def test_from_pretrained_rejects_other_models(tmp_path):
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="AutoencoderKLQwenImage"):
        QwenImageSPTransformer2DModel.from_pretrained(tmp_path / "vae")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="no Qwen-Image transformer config"):
        QwenImageSPTransformer2DModel.from_pretrained(tmp_path / "odd")
    with pytest.raises(TypeError, match="QwenImageTransformer2DModel"):
        QwenImageSPTransformer2DModel.from_transformer(torch.nn.Linear(2, 2))
