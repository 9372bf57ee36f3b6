"""pipeline/localize/config.py: the localize job's one frozen, checked config."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.data.preprocess import ResizeCrop
from pipeline.localize.config import BadInputError, LocalizeConfig
from pipeline.localize.run import row_settings


def _config(**kw) -> LocalizeConfig:
    return LocalizeConfig(**{"shards": "s/", "checkpoint": "c", "output": "o", **kw})


@pytest.mark.parametrize(
    "field,value,flag",
    [("batch_size", 0, "--batch-size"), ("precision", "fp8", "--precision"), ("topk", 0, "--topk"),
     ("max_retries", -1, "--max-retries"), ("limit", 0, "--limit"), ("num_actors", 0, "--num-actors"),
     ("threshold", 1.2, "--threshold"), ("threshold", -0.1, "--threshold"), ("run_id", "a/b", "--run-id"),
     ("max_boxes", 0, "--max-boxes"), ("box_mode", "biggest", "--box-mode"), ("cpus_per_actor", 0, "--cpus-per-actor"),
     ("gpus_per_actor", -1, "--gpus-per-actor"), ("resize_crop", "224,256", "--resize-crop"),
     ("resize_crop", object(), "--resize-crop"), ("decode", "nvjpeg", "--decode")],
)
def test_options_are_checked_with_the_flag_named(field, value, flag):
    with pytest.raises(BadInputError, match=flag):
        _config(**{field: value})


def test_precision_defaults_to_auto_and_accepts_every_choice():
    assert _config().precision == "auto"
    for choice in ("auto", "fp32", "bf16", "fp16"):
        assert _config(precision=choice).precision == choice


def test_frozen_and_the_frame_is_parsed_once():
    config = _config(resize_crop="256,224")
    assert config.resize_crop == ResizeCrop(256, 224)
    assert _config(resize_crop=(256, 224)).resize_crop == ResizeCrop(256, 224)
    assert _config().resize_crop is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 0  # type: ignore[misc]
    # replace() checks again
    with pytest.raises(BadInputError, match="--batch-size"):
        dataclasses.replace(config, batch_size=0)


def test_row_settings_take_the_flags_else_the_checkpoints_threshold_and_names():
    model = {"model": "sat_vit_micro_patch8_64", "num_classes": 2, "sha256": "ab" * 32,
             "threshold": 0.3, "class_names": ["a", "b"]}
    rows = row_settings(_config(topk=3, resize_crop="72,64"), model)
    assert (rows.threshold, rows.topk, rows.class_names, rows.resize_crop) == (0.3, 3, ("a", "b"), ResizeCrop(72, 64))
    assert row_settings(_config(threshold=0.6), model).threshold == 0.6
    without = {k: v for k, v in model.items() if k != "threshold"}
    assert row_settings(_config(), without).threshold == 0.4  # the checkpoint default
    with pytest.raises(BadInputError, match="the threshold of c .* must be in \\[0, 1\\]"):
        row_settings(_config(), {**model, "threshold": 2.0})


def test_decode_defaults_to_auto_and_gpu_without_gpus_is_refused():
    assert _config().decode == "auto"
    assert _config(decode="gpu").decode == "gpu" and _config(decode="cpu", gpus_per_actor=0).decode == "cpu"
    with pytest.raises(BadInputError, match="--decode gpu needs GPUs .* use --decode cpu"):
        _config(decode="gpu", gpus_per_actor=0)
