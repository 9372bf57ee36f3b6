"""pipeline/train/job.py without Ray: one config per job (TrainOptions composed of a
TrainConfig that holds a SATLossConfig), the flags derived from it, the run record that
a resumed run is checked against, and the plan a worker is handed."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from dataclasses import fields

import pytest

from model.losses import SATLossConfig
from pipeline.train.data import SplitIndex
from pipeline.train.job import RUN_FILE, check_run_record
from pipeline.train.options import (
    LOSS_SETTINGS,
    RESUMABLE_CHANGES,
    TrainOptions,
    default_run_name,
    run_config,
    run_fingerprint,
    setting_fields,
    train_setting_names,
)
from pipeline.train.worker import WorkerPlan
from pipeline.train.loop import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PLACES = dict(train_shards="/d/train/", val_shards="/d/val/", output="/d/m.safetensors", storage_path="/d/runs")
# TrainOptions' fields before it held a TrainConfig: the run record's keys, which records
# written then (and the default run name's digest) depend on.
LEGACY_OPTION_KEYS = {
    "alpha", "area_mode", "area_weight", "backbone_lr_scale", "batch_size", "cpus_per_worker", "epochs", "freeze",
    "images_per_class", "img_size", "lr", "max_failures", "method", "model", "model_kwargs", "name", "norm_weight",
    "num_workers", "output", "precision", "pretrained", "ray_log_level", "ray_temp_dir", "recipe", "schedule",
    "seed", "shuffle_buffer", "spatial_loss_ramp", "spatial_loss_start", "stop_after_epochs", "storage_path",
    "threshold_metric", "train_shards", "use_gpu", "val_batch_size", "val_shards", "verbose", "warmup_epochs",
    "weight_decay",
}


def _train_sat():
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    try:
        import train_sat
    finally:
        sys.path.pop(0)
    return train_sat


def test_from_settings_nests_the_loss_and_settings_gives_the_flat_names_back():
    o = TrainOptions.from_settings(**PLACES, lr=3e-4, alpha=0.35, area_mode="image", num_workers=4, seed=7)
    assert o.train.lr == 3e-4 and o.train.seed == 7 and o.num_workers == 4
    assert o.train.loss == SATLossConfig(alpha=0.35, area_mode="image")
    flat = o.settings()
    assert set(flat) == LEGACY_OPTION_KEYS | {"loader_workers"}  # newer, and free to change on resume
    assert (flat["lr"], flat["alpha"], flat["area_mode"], flat["num_workers"]) == (3e-4, 0.35, "image", 4)
    assert TrainOptions.from_settings(**flat) == o
    with pytest.raises(TypeError, match="unexpected keyword argument 'alhpa'"):
        TrainOptions.from_settings(**PLACES, alhpa=0.3)


def test_run_config_resolves_method_img_size_precision_and_class_count():
    o = TrainOptions.from_settings(**PLACES, model="vit_micro_patch8_64", method="cam", img_size=32,
                                   model_kwargs={"depth": 3}, precision="fp32", alpha=0.3)
    assert o.train.model == "sat_vit_micro_patch8_64"  # a bare backbone: sat_ until --method replaces it
    cfg = run_config(o, num_classes=5)
    assert (cfg.model, cfg.num_classes, cfg.precision) == ("cam_vit_micro_patch8_64", 5, "fp32")
    assert cfg.model_kwargs == {"depth": 3, "img_size": 32} and cfg.loss.alpha == 0.3


def test_train_config_stores_flat_and_reads_back_old_checkpoints():
    cfg = TrainConfig(lr=2e-3, loss=SATLossConfig(alpha=0.35, norm_weight=0.5), mean=(0.5, 0.5, 0.5))
    flat = json.loads(json.dumps(cfg.to_dict()))  # as a checkpoint's training info holds it
    assert flat["alpha"] == 0.35 and flat["norm_weight"] == 0.5 and "loss" not in flat
    assert TrainConfig.from_dict(flat) == cfg
    old = {k: v for k, v in flat.items() if k != "smooth_nsig"}  # written before loss was nested
    assert TrainConfig.from_dict(old) == cfg


def test_every_flag_is_a_setting_field_with_its_type_and_default():
    train_sat = _train_sat()
    parser = train_sat.build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    settings = setting_fields()
    assert set(actions) <= set(settings)
    # Every setting of the loop and the loss has a flag (area_mode only comes from recipes).
    assert (set(train_setting_names()) | set(LOSS_SETTINGS)) - set(actions) == {"area_mode"}
    for dest, action in actions.items():
        assert action.option_strings == ["--" + dest.replace("_", "-")]
        f = settings[dest]
        if f.kind is bool:
            assert isinstance(action, argparse._StoreTrueAction), dest
        elif f.kind in (int, float):
            assert action.type is f.kind, dest
        plain = isinstance(f.default, (int, float, str)) and not isinstance(f.default, bool)
        if dest in train_sat.PLACES:
            assert action.required == f.required, dest
        elif plain:
            assert action.help.endswith(f"default {f.default}"), (dest, action.help)
    assert actions["alpha"].help == "target map area; default 0.25" and SATLossConfig().alpha == 0.25
    assert actions["lr"].help == f"default {TrainConfig().lr}"


def test_run_fingerprint_keeps_the_record_format():
    o = TrainOptions.from_settings(**PLACES, lr=3e-4)
    assert set(run_fingerprint(o)) == LEGACY_OPTION_KEYS - RESUMABLE_CHANGES
    assert default_run_name(o) == default_run_name(TrainOptions.from_settings(**PLACES, lr=3e-4, num_workers=8))
    assert default_run_name(o) != default_run_name(TrainOptions.from_settings(**PLACES, lr=1e-4))


def test_an_older_run_record_resumes_and_other_options_do_not(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    o = TrainOptions.from_settings(**PLACES, model="vit_micro_patch8_64", lr=3e-4, name="r")
    # A record as written before: the bare backbone as given, no "schedule" (newer than it).
    old = {k: v for k, v in run_fingerprint(o).items() if k != "schedule"}
    old["model"] = "vit_micro_patch8_64"
    (run / RUN_FILE).write_text(json.dumps(old))
    assert check_run_record(o, str(run)) is True
    with pytest.raises(ValueError, match=r"other options \(lr: 0.0003 then, 0.001 now\)"):
        check_run_record(TrainOptions.from_settings(**PLACES, model="vit_micro_patch8_64", name="r"), str(run))
    with pytest.raises(ValueError, match=r"schedule: 'cosine' then, 'constant' now"):
        check_run_record(TrainOptions.from_settings(**PLACES, model="vit_micro_patch8_64", lr=3e-4,
                                                    schedule="constant", name="r"), str(run))
    fresh = tmp_path / "fresh"
    assert check_run_record(o, str(fresh)) is False  # written now, read back the same
    assert json.loads((fresh / RUN_FILE).read_text()) == run_fingerprint(o)


def test_worker_plan_is_typed_frozen_and_pickles():
    index = SplitIndex("train", ["/d/train-0.tar"], [8], {0: 4, 1: 4}, {0: "a", 1: "b"})
    plan = WorkerPlan(train=TrainConfig(num_classes=2), train_index=index, val_index=index, image_size=64,
                      steps_per_epoch=2, worker_batch_size=2, val_batch_size=4, shuffle_buffer=8,
                      threshold_metric="gt_known", model_config={"model": "sat_vit_micro_patch8_64"})
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and again.train.loss == SATLossConfig()
    assert [f.name for f in fields(again)][:2] == ["train", "train_index"]
    with pytest.raises(AttributeError):
        plan.image_size = 32


def test_loader_workers_option_resolves_from_the_cpu_allotment_and_is_checked():
    from pipeline.train.options import check_options, resolve_loader_workers

    assert resolve_loader_workers(TrainOptions.from_settings(**PLACES)) == 0  # 1 CPU a worker: in a thread
    assert resolve_loader_workers(TrainOptions.from_settings(**PLACES, cpus_per_worker=8, use_gpu=True)) == 7
    assert resolve_loader_workers(TrainOptions.from_settings(**PLACES, cpus_per_worker=8)) == 2
    assert resolve_loader_workers(TrainOptions.from_settings(**PLACES, cpus_per_worker=8, loader_workers="3")) == 3
    with pytest.raises(ValueError, match="--loader-workers must be 'auto' or a number of processes >= 0, got 'many'"):
        check_options(TrainOptions.from_settings(**PLACES, loader_workers="many"))
    with pytest.raises(ValueError, match="--cpus-per-worker must be positive"):
        check_options(TrainOptions.from_settings(**PLACES, cpus_per_worker=0))
    # Not part of the run record: a resumed run may change it.
    assert default_run_name(TrainOptions.from_settings(**PLACES, loader_workers=4)) == default_run_name(
        TrainOptions.from_settings(**PLACES))
