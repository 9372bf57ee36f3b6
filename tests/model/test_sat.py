"""model/sat.py: the SAT network (DESIGN §5) on timm's VisionTransformer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import LocOutput, count_parameters, create_model
from model.sat import SATVisionTransformer, SpatialQueryAttention

MICRO = "sat_vit_micro_patch8_64"  # 64 px, 8 x 8 grid, depth 6, width 128, 4 heads


def micro(num_classes: int = 5, **overrides) -> SATVisionTransformer:
    torch.manual_seed(0)
    overrides.setdefault("drop_path_rate", 0.0)
    return create_model(MICRO, num_classes, **overrides).eval()


def images(batch: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize(
    "backbone, embed_dim",
    [("deit_tiny_patch16_224", 192), ("deit_small_patch16_224", 384), ("deit_base_patch16_224", 768)],
)
def test_deit_variants_output_shapes(backbone, embed_dim):
    torch.manual_seed(0)
    model = create_model(f"sat_{backbone}", 200).eval()
    assert isinstance(model, SATVisionTransformer)
    assert model.embed_dim == embed_dim and len(model.blocks) == 12 and model.grid == (14, 14)
    assert [b.attn.reweight for b in model.blocks] == [False] * 9 + [True] * 3
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert isinstance(out, LocOutput)
    assert out.logits.shape == (1, 200)
    assert out.loc_map.shape == (1, 1, 14, 14)
    assert out.loc_map.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert (out.loc_map > 0).all() and (out.loc_map < 1).all()


def meta_count(name: str, num_classes: int) -> int:
    """Parameters of a model built on the meta device (shapes only, no init cost)."""
    with torch.device("meta"):
        return count_parameters(create_model(name, num_classes))


def test_parameter_counts_deit_small():
    sat_200 = meta_count("sat_deit_small_patch16_224", 200)
    sat_1000 = meta_count("sat_deit_small_patch16_224", 1000)
    cam_200 = meta_count("cam_deit_small_patch16_224", 200)
    # DeiT-S backbone without its linear head: 22,050,664 - (384 * 1000 + 1000).
    backbone = 22_050_664 - 385_000
    conv_head = lambda classes: 384 * classes * 9 + classes  # noqa: E731
    assert sat_200 == backbone + 2 * 384 + conv_head(200) == 22_357_832  # ~22.36 M
    assert sat_1000 == backbone + 2 * 384 + conv_head(1000) == 25_123_432  # ~25.12 M
    # The spatial token and its position embedding are the only extra parameters.
    assert sat_200 - cam_200 == 2 * 384


@pytest.mark.parametrize("backbone, embed_dim", [("deit_tiny_patch16_224", 192), ("vit_micro_patch8_64", 128)])
def test_sat_minus_cam_is_two_embed_dims(backbone, embed_dim):
    with torch.device("meta"):
        sat = create_model(f"sat_{backbone}", 7)
        cam = create_model(f"cam_{backbone}", 7)
    assert count_parameters(sat) - count_parameters(cam) == 2 * embed_dim
    assert sat.spatial_token.shape == sat.spatial_pos_embed.shape == (1, 1, embed_dim)
    # The spatial token and its position embedding get no weight decay (DESIGN §5).
    assert {"spatial_token", "spatial_pos_embed", "pos_embed", "cls_token"} <= sat.no_weight_decay()


def test_spatial_token_init_is_trunc_normal_002():
    torch.manual_seed(3)
    model = create_model("sat_deit_base_patch16_224", 2, depth=1, reweight_blocks=1)
    for p in (model.spatial_token, model.spatial_pos_embed):
        # timm's trunc_normal_ cuts at +-2 absolute (as DeiT does), so at std 0.02 it is a
        # plain normal: 768 samples have a std within a few % of 0.02 and a mean near 0.
        assert 0.018 < p.std().item() < 0.022
        assert abs(p.mean().item()) < 0.003
    assert not torch.equal(model.spatial_token, model.spatial_pos_embed)


def test_token_order_is_cls_patches_spatial():
    model = micro()
    x = images(1)
    tokens = model._pos_embed(model.patch_embed(x))
    assert tokens.shape == (1, 1 + 64 + 1, 128)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0])
    torch.testing.assert_close(tokens[:, -1], (model.spatial_token + model.spatial_pos_embed)[:, 0])
    torch.testing.assert_close(tokens[:, 1:-1], model.patch_embed(x) + model.pos_embed[:, 1:])


def test_head_is_conv_gap_on_final_patch_tokens_only():
    model = micro()
    x = images(2)
    with torch.no_grad():
        tokens, loc_map = model.forward_features(x)
        out = model(x)
        patches = tokens[:, 1:65].transpose(1, 2).reshape(2, 128, 8, 8)
        expected = F.conv2d(patches, model.head.conv.weight, model.head.conv.bias, padding=1).mean(dim=(2, 3))
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loc_map, loc_map)


# ---------------------------------------------------------------- spatial-query attention


def reference_spatial_attention(attn: SpatialQueryAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN §5 written out: softmax(q k^T * scale) * M[None, None, None, :] @ v, per image."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, n, h, d).transpose(1, 2) for i in range(3))
    logits = (q @ k.transpose(-2, -1)) * d ** -0.5  # B x H x N x N
    probs = logits.softmax(dim=-1)
    maps, outs = [], []
    for i in range(b):
        m = torch.sigmoid(logits[i, :, -1, :].mean(dim=0))  # the spatial query's row, mean over heads
        maps.append(m)
        outs.append((probs[i] * m[None, None, :]) @ v[i])  # every head, every query; no renormalisation
    out = torch.stack(outs).transpose(1, 2).reshape(b, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias, torch.stack(maps)


@pytest.mark.parametrize("fused", [True, False])
def test_v_scaling_equals_column_scaled_softmax(fused):
    torch.manual_seed(0)
    attn = SpatialQueryAttention(32, num_heads=4, qkv_bias=True).eval()
    attn.reweight = True
    attn.fused_attn = fused
    x = torch.randn(3, 11, 32) * 2
    with torch.no_grad():
        expected_out, expected_map = reference_spatial_attention(attn, x)
        out = attn(x)
    assert attn.spatial_map.shape == (3, 11)
    torch.testing.assert_close(attn.spatial_map, expected_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    # The gate really changes things: plain attention differs.
    attn.reweight = False
    with torch.no_grad():
        plain = attn(x)
    assert attn.spatial_map is None
    assert (plain - out).abs().max() > 1e-2


def test_fused_and_unfused_models_agree():
    model = micro()
    x = images(2)
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        unfused = model(x)
    torch.testing.assert_close(fused.logits, unfused.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.loc_map, unfused.loc_map, rtol=1e-5, atol=1e-6)


def _block_outputs(model: SATVisionTransformer, x: torch.Tensor) -> tuple[list[torch.Tensor], list, LocOutput]:
    """Run the model, recording every block's output and every attention module's output."""
    blocks, attns = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o.detach().clone())) for b in model.blocks]
    hooks += [b.attn.register_forward_hook(lambda m, i, o: attns.append(o.detach().clone())) for b in model.blocks]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return blocks, attns, out


@pytest.mark.parametrize("replacement", [0.0, 1.0])
def test_map_gates_only_the_reweighted_blocks(monkeypatch, replacement):
    model = micro()
    x = images(2)
    base_blocks, _, base_out = _block_outputs(model, x)

    calls = []
    real_sigmoid = torch.sigmoid

    def constant_map(t):  # M := zeros / ones wherever the model computes it
        calls.append(t.shape)
        return torch.full_like(real_sigmoid(t), replacement)

    monkeypatch.setattr(torch, "sigmoid", constant_map)
    blocks, attns, out = _block_outputs(model, x)
    monkeypatch.undo()
    assert calls, "the map was never computed through torch.sigmoid: the replacement did not take"

    first = len(model.blocks) - model.reweight_blocks  # 3
    for i in range(first):
        assert torch.equal(blocks[i], base_blocks[i]), f"block {i} is not re-weighted but changed"
    for i in range(first, len(model.blocks)):
        assert (blocks[i] - base_blocks[i]).abs().max() > 1e-3, f"block {i} ignored the map"
    assert (out.logits - base_out.logits).abs().max() > 1e-4
    assert torch.all(out.loc_map == replacement)

    if replacement == 0.0:
        # Every value row zeroed: the attention output is the projection's bias alone.
        bias = model.blocks[first].attn.proj.bias
        torch.testing.assert_close(attns[first], bias.expand_as(attns[first]))
    else:
        # M = 1 is plain attention: the same tokens through un-gated timm attention.
        for block in model.blocks:
            block.attn.reweight = False
        with torch.no_grad():
            t = model._pos_embed(model.patch_embed(x))
            for i, block in enumerate(model.blocks):
                t = block(t)
                torch.testing.assert_close(t, blocks[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reweight_blocks", [1, 2, 3, 6])
def test_reweight_blocks_option_and_map_is_mean_over_them(reweight_blocks):
    model = micro(reweight_blocks=reweight_blocks)
    depth = len(model.blocks)
    assert [b.attn.reweight for b in model.blocks] == [i >= depth - reweight_blocks for i in range(depth)]
    maps = {}
    hooks = [
        b.attn.register_forward_hook(lambda m, i, o, idx=idx: maps.__setitem__(idx, m.spatial_map))
        for idx, b in enumerate(model.blocks)
    ]
    with torch.no_grad():
        out = model(images(2))
    for h in hooks:
        h.remove()
    gated = [maps[i] for i in range(depth) if maps[i] is not None]
    assert len(gated) == reweight_blocks
    expected = torch.stack(gated).mean(0)[:, 1:65].reshape(2, 1, 8, 8)  # patch positions only
    torch.testing.assert_close(out.loc_map, expected)
    # The spatial module state is not left holding tensors after the forward.
    assert all(b.attn.spatial_map is None for b in model.blocks)


def test_loc_map_values_in_open_unit_interval():
    model = micro()
    with torch.no_grad():
        out = model(images(4) * 3)
    assert out.loc_map.shape == (4, 1, 8, 8)
    assert (out.loc_map > 0).all() and (out.loc_map < 1).all()
    assert out.loc_map.std() > 0  # a real map, not a constant


def test_gradients_reach_spatial_token_and_its_pos_embed():
    model = micro().train()
    x = images(2)
    model(x).loc_map.mean().backward()
    for p in (model.spatial_token, model.spatial_pos_embed):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # Token and embedding are summed, so their gradients are the same tensor values.
    torch.testing.assert_close(model.spatial_token.grad, model.spatial_pos_embed.grad)

    # The classifier alone also trains the token: it is a key and value of every block.
    model.zero_grad()
    F.cross_entropy(model(x).logits, torch.tensor([0, 3])).backward()
    assert model.spatial_token.grad.abs().sum() > 0


def test_drop_path_option():
    model = micro(drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]  # rate 0 is an Identity
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == sorted(rates)
    x = images(4)
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)  # eval: no drop
        model.train()
        torch.manual_seed(0)
        a = model(x).logits
        torch.manual_seed(1)
        b = model(x).logits
    assert (a - b).abs().max() > 1e-4  # train: stochastic depth

    plain = micro(drop_path_rate=0.0).train()
    assert all(b.drop_path1.__class__.__name__ == "Identity" for b in plain.blocks)
    with torch.no_grad():
        assert torch.equal(plain(x).logits, plain(x).logits)
    # The design's default is drop path 0.1.
    default = create_model(MICRO, 5)
    assert default.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_overrides_change_the_backbone():
    model = create_model(MICRO, 3, img_size=32, depth=4, reweight_blocks=2).eval()
    assert model.grid == (4, 4) and len(model.blocks) == 4
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3) and out.loc_map.shape == (2, 1, 4, 4)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name", ["sat_deit_huge_patch16_224", "deit_small_patch16_224", "gradcam_deit_small_patch16_224", "sat_", ""]
)
def test_unknown_variant(name):
    with pytest.raises(ValueError, match="unknown model.*choose one of"):
        create_model(name, 10)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, "10", None])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model(MICRO, num_classes)


@pytest.mark.parametrize("reweight_blocks", [0, 7])
def test_bad_reweight_blocks(reweight_blocks):
    with pytest.raises(ValueError, match=r"reweight_blocks must be in 1\.\.6"):
        create_model(MICRO, 3, reweight_blocks=reweight_blocks)


def test_reweight_blocks_is_sat_only():
    with pytest.raises(ValueError, match="only apply to SAT"):
        create_model("cam_vit_micro_patch8_64", 3, reweight_blocks=2)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 56, 64), "expected 64x64 images.*got 56x64"),
        ((1, 3, 224, 224), "expected 64x64 images.*got 224x224"),
        ((1, 1, 64, 64), "expected images of shape B x 3 x H x W, got \\(1, 1, 64, 64\\)"),
        ((1, 4, 64, 64), "expected images of shape B x 3 x H x W"),
        ((3, 64, 64), "expected images of shape B x 3 x H x W, got \\(3, 64, 64\\)"),
    ],
)
def test_bad_images(shape, message):
    model = micro()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))
