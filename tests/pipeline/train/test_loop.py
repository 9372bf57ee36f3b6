"""pipeline/train/loop.py: the lr schedules and the config's checks (the loop itself runs in
tests/jobs/test_train_job.py)."""
from __future__ import annotations

import math

import pytest

from pipeline.train.loop import TrainConfig, lr_factor


def test_constant_schedule_keeps_the_lr_after_the_warmup():
    assert [lr_factor(s, 100, 0, "constant") for s in (0, 1, 50, 99)] == [1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, 4, "constant") for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_cosine_schedule_goes_to_zero():
    assert lr_factor(0, 100, 0) == 1.0
    assert lr_factor(50, 100, 0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_factor(3, 100, 4) == 1.0 and lr_factor(4, 100, 4) == 1.0


def test_config_rejects_unknown_schedule_and_unresolved_precision():
    assert TrainConfig(schedule="constant").schedule == "constant"
    with pytest.raises(ValueError, match="--schedule must be one of"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="--precision must be one of"):
        TrainConfig(precision="auto")  # the job resolves auto before building a config
