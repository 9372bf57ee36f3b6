"""pipeline/train/loop.py's freeze modes: ``--freeze backbone`` trains the spatial token, its
position embedding and the head only, on a tiny DINOv2-shaped model (registers, LayerScale)."""
from __future__ import annotations

import pytest
import torch

from pipeline.train.loop import (
    FREEZE_MODES,
    TrainConfig,
    apply_freeze,
    build_model,
    build_optimizer,
    train_epoch,
    trainable_parameters,
)

TINY = dict(img_size=56, depth=3, embed_dim=48, num_heads=2)  # a 4 x 4 grid, 5 prefix tokens
HEAD_AND_TOKEN = {"spatial_token", "spatial_pos_embed", "head.conv.weight", "head.conv.bias"}


def config(freeze: str, **kw) -> TrainConfig:
    return TrainConfig(model="sat_dinov2_small_patch14_reg4", num_classes=3, model_kwargs=TINY, freeze=freeze,
                       epochs=1, batch_size=4, lr=1e-2, warmup_epochs=0.0, **kw)


def batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def test_freeze_modes_choose_what_trains():
    assert FREEZE_MODES == ("none", "token", "backbone")
    model = build_model(config("backbone"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == HEAD_AND_TOKEN
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * 48 + 48 * 3 * 9 + 3 and total == sum(p.numel() for p in model.parameters())
    apply_freeze(model, "token")  # token mode also trains the re-weighted (last 3) blocks
    assert {n for n, p in model.named_parameters() if p.requires_grad} > HEAD_AND_TOKEN | {"blocks.0.attn.qkv.weight"}
    assert not model.cls_token.requires_grad and not model.reg_token.requires_grad
    apply_freeze(model, "none")
    assert trainable_parameters(model)[0] == trainable_parameters(model)[1]
    with pytest.raises(ValueError, match="--freeze must be one of"):
        config("all")


def test_optimizer_holds_only_the_trainable_tensors():
    model = build_model(config("backbone"))
    optimizer = build_optimizer(model, config("backbone"))
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in HEAD_AND_TOKEN}


def test_a_step_leaves_the_frozen_backbone_bit_identical():
    cfg = config("backbone")
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    metrics = train_epoch(model, batches(), optimizer, cfg, epoch=0, steps_per_epoch=2)
    assert metrics["images"] == 8
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == HEAD_AND_TOKEN  # the spatial token gets a gradient through the frozen blocks
    assert all(after[n].grad is None for n in before if n not in HEAD_AND_TOKEN)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
