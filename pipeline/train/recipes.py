"""The shipped training recipes.

- ``RECIPES``: what `make demo` and `make quality` use for SAT and for the CAM baseline on
  the CPU-sized synthetic task. Both methods get the same model size, data, epochs and
  optimiser; the SAT-only knobs are the spatial terms' weights and schedule. How these
  were chosen, with every variant tried: docs/quality.md.
- ``TRAIN_RECIPES``: what ``jobs/train_sat.py --recipe cub|imagenet|demo`` sets. ``cub``
  and ``imagenet`` are every hyper-parameter of the official SAT runs (shared DESIGN §5);
  ``demo`` is the CPU recipe above. Flags given on the command line override a recipe.
"""
from __future__ import annotations

COMMON = dict(
    model_kwargs={},
    epochs=10,
    batch_size=128,
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=1.0,
    precision="fp32",
)

RECIPES: dict[str, dict] = {
    "cam": dict(COMMON, model="cam_vit_micro_patch8_64"),
    # The official loss from the first step (alpha 0.25, batch area, weights 1): on the
    # synthetic birds it beat both CAM and the curriculum variant (docs/quality.md).
    "sat": dict(COMMON, model="sat_vit_micro_patch8_64", alpha=0.25, area_mode="batch", norm_weight=1.0),
}


# The ImageNet stand-in that SAT fine-tunes from (as the paper fine-tunes ImageNet DeiT):
# a plain classifier trained on the "plumage" family, whose classes are decided by the
# whole body. CAM starts from the same backbone, so both methods get the same budget.
PRETRAIN = dict(
    train_samples=10000,
    num_classes=24,
    settings=dict(COMMON, model="cam_vit_micro_patch8_64", epochs=8),
)


# The official runs (DESIGN §5): DeiT-S fine-tuned with AdamW (wd 0.05, none on 1-D params
# and embeddings), a constant lr without warm-up (the official code builds a cosine schedule
# but never applies it), drop path 0.1, the full loss from the first step with weights 1.
# Augmentation: Resize 256x256, RandomCrop 224, horizontal flip, which is what
# pipeline.data.preprocess.train_transform does for a 224 input.
OFFICIAL = dict(
    model="sat_deit_small_patch16_224",
    model_kwargs={"drop_path_rate": 0.1},
    weight_decay=0.05,
    warmup_epochs=0.0,
    schedule="constant",
    area_weight=1.0,
    norm_weight=1.0,
    area_mode="batch",
    spatial_loss_start=0.0,
    spatial_loss_ramp=0.0,
    backbone_lr_scale=1.0,
    freeze="none",
)

TRAIN_RECIPES: dict[str, dict] = {
    "cub": dict(OFFICIAL, lr=1e-4, batch_size=256, epochs=30, alpha=0.25),
    "imagenet": dict(OFFICIAL, lr=1.5e-5, batch_size=512, epochs=1, alpha=0.35),
    "demo": RECIPES["sat"],
}


def train_recipe(name: str, explicit: dict) -> dict:
    """A recipe's settings with the explicitly given ones on top (``model_kwargs`` merged key
    by key, so ``--model-kwargs '{"depth": 6}'`` keeps the recipe's drop path)."""
    if name not in TRAIN_RECIPES:
        raise ValueError(f"unknown --recipe {name!r}; choose one of {', '.join(TRAIN_RECIPES)}")
    settings = {**TRAIN_RECIPES[name], **explicit}
    settings["model_kwargs"] = {**TRAIN_RECIPES[name].get("model_kwargs", {}), **explicit.get("model_kwargs", {})}
    return settings


def recipe(method: str, **overrides) -> dict:
    if method not in RECIPES:
        raise ValueError(f"unknown recipe {method!r}; choose one of {', '.join(RECIPES)}")
    return {**RECIPES[method], **overrides}
