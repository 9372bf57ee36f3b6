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
    "sat": dict(
        COMMON,
        model="sat_vit_micro_patch8_64",
        alpha=0.25,
        norm_weight=0.2,
        area_mode="image",
        spatial_loss_start=3.0,
        spatial_loss_ramp=3.0,
    ),
}


def recipe(method: str, **overrides) -> dict:
    if method not in RECIPES:
        raise ValueError(f"unknown recipe {method!r}; choose one of {', '.join(RECIPES)}")
    return {**RECIPES[method], **overrides}
