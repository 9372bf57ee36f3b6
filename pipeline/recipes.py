"""The shipped training recipes: what `make demo`, `make quality` and `jobs/train_sat.py`'s
documentation use for SAT and for the CAM baseline on the CPU-sized synthetic task.

Both methods get the same model size, data, epochs and optimiser; the SAT-only knobs are
the spatial terms' weights and schedule. How these were chosen, with every variant tried:
docs/quality.md.
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


def recipe(method: str, **overrides) -> dict:
    if method not in RECIPES:
        raise ValueError(f"unknown recipe {method!r}; choose one of {', '.join(RECIPES)}")
    return {**RECIPES[method], **overrides}
