"""model/factory.py's self-supervised and newer backbones (DINOv2 with and without registers,
DeiT III) and model/pretrained.py's filter for their weights, timm's and DINOv2's official layout.

Weights are timm models with random weights, nudged so that no tensor equals a fresh init
and LayerScale lets every block matter (its init, 1e-5, would hide a wrongly loaded block).
Most tests use depth-3 backbones: loading and the token layout do not depend on depth.
"""
from __future__ import annotations

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import LayerScale
from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter

from model import count_parameters, create_model
from model.factory import BACKBONES, TIMM_NAMES
from model.pretrained import checkpoint_filter_fn
from model.sat import SATVisionTransformer

NEW = {  # our backbone -> (timm's model, grid at 224, prefix tokens)
    "dinov2_small_patch14": ("vit_small_patch14_dinov2", 16, 1),
    "dinov2_small_patch14_reg4": ("vit_small_patch14_reg4_dinov2", 16, 5),
    "dinov2_base_patch14": ("vit_base_patch14_dinov2", 16, 1),
    "dinov2_base_patch14_reg4": ("vit_base_patch14_reg4_dinov2", 16, 5),
    "deit3_small_patch16_224": ("deit3_small_patch16_224", 14, 1),
}
TINY = dict(depth=3, drop_path_rate=0.0)


def nudged(sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if k.endswith(".gamma"):  # LayerScale: make the blocks count
            out[k] = 0.5 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous()
    return out


def timm_weights(timm_name: str, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nudged(timm.create_model(timm_name, pretrained=False, num_classes=0, **{**TINY, **kwargs}).state_dict())


def images(batch: int = 2, size: int = 224) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def timm_reference(timm_name: str, sd: dict[str, torch.Tensor], **kwargs):
    """timm's own model at 224 px with ``sd`` put through timm's own filter: what loading must match."""
    ref = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=224, **{**TINY, **kwargs}).eval()
    ref.load_state_dict(timm_filter(dict(sd), ref))
    return ref


def official_dinov2(sd: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    """timm's DINOv2 state dict in the official facebookresearch/dinov2 release layout."""
    out = {k: v for k, v in sd.items()}
    c = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.randn(1, c, generator=torch.Generator().manual_seed(seed))
    if "reg_token" in out:  # official: pos_embed has the cls position, the registers none
        cls_pos = torch.randn(1, 1, c, generator=torch.Generator().manual_seed(seed + 1))
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
    return out


# ---------------------------------------------------------------- the architecture


@pytest.mark.parametrize("backbone", list(NEW))
def test_new_backbones_match_timm_layouts(backbone):
    timm_name, grid, prefix = NEW[backbone]
    with torch.device("meta"):
        sat = create_model(f"sat_{backbone}", 200)
        cam = create_model(f"cam_{backbone}", 200)
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=224)
    assert isinstance(sat, SATVisionTransformer)
    assert sat.grid == cam.grid == (grid, grid) and sat.num_prefix_tokens == prefix
    assert isinstance(sat.blocks[0].ls1, LayerScale) and isinstance(sat.blocks[-1].ls2, LayerScale)
    assert [b.attn.reweight for b in sat.blocks] == [False] * 9 + [True] * 3
    # The same backbone tensors as timm's model, plus the spatial token and a conv head.
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    own_shapes = {k: v.shape for k, v in sat.state_dict().items() if not k.startswith(("head.", "spatial_"))}
    assert own_shapes == ref_shapes
    c = sat.embed_dim
    conv_head = c * 200 * 9 + 200
    assert count_parameters(sat) == count_parameters(ref) + 2 * c + conv_head
    assert count_parameters(sat) - count_parameters(cam) == 2 * c


def test_dinov2_small_at_224_gives_16x16_maps_and_logits():
    torch.manual_seed(0)
    model = create_model("sat_dinov2_small_patch14_reg4", 10, drop_path_rate=0.0).eval()
    with torch.no_grad():
        out = model(images(1))
    assert out.logits.shape == (1, 10) and out.loc_map.shape == (1, 1, 16, 16)
    assert (out.loc_map > 0).all() and (out.loc_map < 1).all() and torch.isfinite(out.logits).all()


def tiny_reg4(**overrides) -> SATVisionTransformer:
    torch.manual_seed(0)
    kwargs = dict(depth=3, embed_dim=48, num_heads=2, drop_path_rate=0.0, reweight_blocks=2, **overrides)
    model = create_model("sat_dinov2_small_patch14_reg4", 6, **kwargs).eval()
    with torch.no_grad():  # make the tokens distinguishable
        model.reg_token.normal_()
        model.cls_token.normal_()
    return model


def test_token_order_is_cls_registers_patches_spatial():
    model = tiny_reg4()
    x = images(2)
    patches = model.patch_embed(x)
    tokens = model._pos_embed(patches)
    assert tokens.shape == (2, 1 + 4 + 256 + 1, 48)
    torch.testing.assert_close(tokens[:, 0], model.cls_token[0].expand(2, -1))  # no pos embed on cls
    torch.testing.assert_close(tokens[:, 1:5], model.reg_token.expand(2, -1, -1))  # nor on registers
    torch.testing.assert_close(tokens[:, 5:261], patches + model.pos_embed)
    torch.testing.assert_close(tokens[:, -1], (model.spatial_token + model.spatial_pos_embed)[0].expand(2, -1))


def test_map_and_head_read_patch_positions_only():
    model = tiny_reg4()
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: seen.append(m.spatial_map)) for b in model.blocks]
    x = images(2)
    with torch.no_grad():
        tokens, loc_map = model.forward_features(x)
        logits = model.forward_head(tokens)
    for h in hooks:
        h.remove()
    maps = torch.stack([m for m in seen if m is not None])  # the 2 re-weighted blocks, B x (5+256+1)
    assert maps.shape == (2, 2, 262)
    expected = maps.mean(0)[:, 5:261].reshape(2, 1, 16, 16)
    torch.testing.assert_close(loc_map, expected)
    assert not torch.allclose(maps.mean(0)[:, 1:257].reshape(2, 1, 16, 16), loc_map)  # registers are not map
    torch.testing.assert_close(logits, model.head(tokens[:, 5:261], (16, 16)))


def test_other_input_sizes_resize_the_grid_and_position_embedding():
    model = tiny_reg4(img_size=112)
    assert model.grid == (8, 8) and model.pos_embed.shape == (1, 64, 48)  # no positions for cls/registers
    with torch.no_grad():
        assert model(images(1, 112)).loc_map.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="fixed input size"):
        create_model("sat_dinov2_small_patch14", 3, dynamic_img_size=True)


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("backbone", ["dinov2_small_patch14", "dinov2_small_patch14_reg4", "deit3_small_patch16_224"])
def test_timm_weights_load_and_the_backbone_computes_as_timm(tmp_path, backbone):
    """A timm-format file (DINOv2 at timm's 518 px: 37 x 37 positions, resized to 16 x 16)."""
    timm_name = NEW[backbone][0]
    sd = timm_weights(timm_name)
    path = tmp_path / f"{backbone}.safetensors"
    save_file(sd, str(path))
    cam = create_model(f"cam_{backbone}", 5, pretrained=str(path), **TINY).eval()
    sat = create_model(f"sat_{backbone}", 5, pretrained=str(path), **TINY).eval()
    ref = timm_reference(timm_name, sd)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(cam.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    ref_sd = ref.state_dict()
    for model in (cam, sat):
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in ref_sd.items()), "backbone tensors differ from timm's"
    report = sat.pretrained_report
    assert report.unexpected_fresh == [] and report.dropped == []
    assert report.pos_embed_resized == (((37, 37), (16, 16)) if "dinov2" in backbone else None)


@pytest.mark.parametrize("registers", [False, True])
def test_official_dinov2_release_loads_like_timm_converts_it(tmp_path, registers):
    timm_name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    backbone = "dinov2_small_patch14" + ("_reg4" if registers else "")
    # At 224 px: no resizing, so timm's own model with these weights is the ground truth.
    sd = timm_weights(timm_name, img_size=224)
    ref = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=224, **TINY).eval()
    ref.load_state_dict(sd)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official_dinov2(sd), str(path))
    cam = create_model(f"cam_{backbone}", 5, pretrained=str(path), **TINY).eval()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(cam.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    # At timm's 518 px, resized: the same tensors timm's own filter makes.
    sd518 = timm_weights(timm_name)
    torch.save(official_dinov2(sd518), str(path))
    sat = create_model(f"sat_{backbone}", 5, pretrained=str(path), **TINY)
    ref = timm_reference(timm_name, official_dinov2(sd518))
    own = sat.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=1e-6, msg=k)
    assert sat.pretrained_report.unexpected_fresh == []


def test_dinov2_training_checkpoint_layout_and_deit3_gammas(tmp_path):
    """``teacher`` / ``backbone.`` / chunked blocks (DINOv2 training), ``gamma_1`` (official DeiT III)."""
    sd = timm_weights("vit_small_patch14_dinov2")
    chunked = {f"backbone.{k.replace('blocks.1.', 'blocks.0.1.').replace('blocks.0.norm', 'blocks.0.0.norm')}": v
               for k, v in official_dinov2(sd).items()}
    chunked = {k.replace("blocks.0.attn", "blocks.0.0.attn").replace("blocks.0.ls", "blocks.0.0.ls")
               .replace("blocks.0.mlp", "blocks.0.0.mlp"): v for k, v in chunked.items()}
    chunked["dino_head.mlp.0.weight"] = torch.zeros(2, 2)
    out = checkpoint_filter_fn({"teacher": chunked}, create_model("sat_dinov2_small_patch14", 3, **TINY))
    assert {k for k in out if k.startswith("blocks.")} == {k for k in sd if k.startswith("blocks.")}
    torch.testing.assert_close(out["blocks.1.ls2.gamma"], sd["blocks.1.ls2.gamma"])

    deit3 = timm_weights("deit3_small_patch16_224")
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in deit3.items()}
    assert "blocks.0.gamma_1" in official
    torch.save({"model": official}, str(tmp_path / "deit_3_small_224_1k.pth"))
    model = create_model("sat_deit3_small_patch16_224", 3, pretrained=str(tmp_path / "deit_3_small_224_1k.pth"), **TINY)
    assert torch.equal(model.blocks[1].ls1.gamma, deit3["blocks.1.ls1.gamma"])
    assert model.pretrained_report.unexpected_fresh == []


@pytest.mark.parametrize(
    "timm_name, backbone, message",
    [
        ("vit_small_patch14_reg4_dinov2", "dinov2_small_patch14",
         r"'reg_token': the checkpoint has 4 register tokens but this model has 0.*with registers"),
        ("vit_small_patch14_dinov2", "dinov2_small_patch14_reg4",
         r"'reg_token': the checkpoint has 0 register tokens but this model has 4.*without registers"),
        ("vit_base_patch14_dinov2", "dinov2_small_patch14", r"weight '[\w.]+' has shape \(.*768.*\) but this model"),
        ("deit_tiny_patch16_224", "deit3_small_patch16_224", r"pretrained weight '[\w.]+' has shape .* same backbone"),
    ],
)
def test_mismatched_files_name_the_tensor(tmp_path, timm_name, backbone, message):
    torch.manual_seed(0)
    sd = timm.create_model(timm_name, pretrained=False, num_classes=0, depth=3).state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=message):
        create_model(f"sat_{backbone}", 3, pretrained=str(tmp_path / "w.safetensors"), **TINY)


def test_pos_embed_with_a_cls_position_into_deit3_is_refused():
    """DeiT's 197 positions (cls + 14 x 14) do not fit DeiT III's 196 (no cls position)."""
    sd = timm_weights("deit3_small_patch16_224")
    sd["pos_embed"] = torch.cat([torch.zeros(1, 1, 384), sd["pos_embed"]], dim=1)
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 197, 384\).*another backbone"):
        checkpoint_filter_fn(sd, create_model("sat_deit3_small_patch16_224", 3, **TINY))


def test_pretrained_true_asks_timm_for_the_matching_model(monkeypatch, caplog):
    asked = []
    real_create = timm.create_model
    sd = timm_weights("vit_small_patch14_reg4_dinov2")

    def fake_hub(name, pretrained=False, **kwargs):  # stands in for the model hub
        asked.append((name, pretrained))
        model = real_create(name, pretrained=False, num_classes=0, **{**TINY, **kwargs})
        model.load_state_dict(sd)
        return model

    monkeypatch.setattr(timm, "create_model", fake_hub)
    with caplog.at_level(logging.INFO, logger="satloc.pretrained"):
        model = create_model("sat_dinov2_small_patch14_reg4", 4, pretrained=True, **TINY)
    assert asked == [("vit_small_patch14_reg4_dinov2", True)]
    assert torch.equal(model.reg_token, sd["reg_token"])
    assert "pos_embed resized 37x37 -> 16x16" in caplog.text
    assert set(TIMM_NAMES) | {"deit3_small_patch16_224"} == set(NEW) and set(NEW) <= set(BACKBONES)
