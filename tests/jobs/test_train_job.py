"""jobs/train_sat.py and pipeline/train/job.py: 2-worker Ray Train (gloo, CPU) on tiny
synthetic shards in the SeaweedFS S3 store; resume after an interruption; freeze modes;
bad input. One in-process Ray cluster for the module (Ray Train start-up is the cost)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import torch

from model import create_model
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint
from model.checkpoint import default_config
from model.precision import resolve_precision
from pipeline.local_ray import start_local_ray
from pipeline.train.recipes import RECIPES
from pipeline.data.storage import StorageError, url_to_fs
from pipeline.datasets.synthetic import class_names, write_synthetic_shards
from pipeline.train.data import TrainDataError
from pipeline.train.job import run_training
from pipeline.train.options import TrainOptions
from pipeline.train.loop import TrainConfig, build_model, is_token_or_head

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_CLASSES = 4
# A tiny SAT: 32 px input, 4x4 grid, 3 blocks of which the last 2 are re-weighted.
MODEL_KWARGS = dict(patch_size=8, depth=3, embed_dim=32, num_heads=2, reweight_blocks=2)


@pytest.fixture(scope="module")
def cluster(s3_store):
    """Ray in-process on loopback with its own short temp dir, started as the train job starts
    one (``start_local_ray``); AWS_* point at SeaweedFS."""
    import ray

    saved = {k: os.environ.get(k) for k in s3_store.env()}
    os.environ.update(s3_store.env())
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    start_local_ray(num_cpus=2, _temp_dir=temp_dir, log_to_driver=True)
    try:
        yield s3_store
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def data(cluster):
    prefix = f"s3://satloc/test_train_job/{uuid.uuid4().hex[:8]}"
    write_synthetic_shards(f"{prefix}/train/", "train", 64, seed=3, shard_size=16, num_classes=NUM_CLASSES)
    write_synthetic_shards(f"{prefix}/val/", "val", 24, seed=3, shard_size=24, num_classes=NUM_CLASSES)
    return prefix


def options(data: str, name: str, **overrides) -> TrainOptions:
    base = dict(
        train_shards=f"{data}/train/", val_shards=f"{data}/val/",
        output=f"{data}/out/{name}.safetensors", storage_path=f"{data}/runs", name=name,
        model="sat_vit_micro_patch8_64", img_size=32, model_kwargs=dict(MODEL_KWARGS),
        epochs=3, batch_size=16, lr=3e-3, warmup_epochs=0.5, num_workers=2, seed=0,
        shuffle_buffer=16, val_batch_size=32,
        precision="fp32",  # the resume and rerun tests compare figures with full_run's
    )
    base.update(overrides)
    return TrainOptions.from_settings(**base)


@pytest.fixture(scope="module")
def full_run(data):
    return run_training(options(data, "full"))


def _is_checkpoint(path: str) -> bool:
    return re.fullmatch(r"checkpoint_\d{4}-.*", path.rstrip("/").rsplit("/", 1)[-1]) is not None


def _state(url: str) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(url)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_workers_train_from_s3_and_checkpoint_there(full_run, data):
    r = full_run
    history = r["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["images"] == 64 and h["val_images"] == 24 for h in history)
    assert r["steps_per_epoch"] == 4 and r["train_images"] == 64 and not r["resumed"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.05, [h["loss"] for h in history]
    for h in history:
        assert h["ce"] > 0 and 0 <= h["area"] <= 1 and 0 <= h["norm"] <= 0.25
        assert 0 <= h["input_wait"] < 1 and h["skipped"] == 0
        assert 0 < h["map_area"] < 1 and 0 <= h["train_acc"] <= 1
        assert 0 <= h["val_top1"] <= 100 and 0 <= h["val_gt_known_loc"] <= 100
    # The exported checkpoint, on S3: class names from the shards, threshold from val.
    model, config = load_checkpoint(r["checkpoint"], expected_num_classes=NUM_CLASSES)
    assert r["checkpoint"] == f"{data}/out/full.safetensors"
    assert config["class_names"] == class_names("birds", NUM_CLASSES)
    assert config["threshold"] == r["threshold"] == history[-1]["val_threshold"]
    assert 0.0 <= config["threshold"] <= 1.0
    assert config["model_kwargs"]["img_size"] == 32 and config["mean"] == [0.485, 0.456, 0.406]
    assert config["training"]["epochs_done"] == 3 and config["training"]["threshold_metric"] == "gt_known"
    assert config["sha256"] == r["sha256"]
    # Ray Train's per-epoch checkpoints live in the S3 storage path (the 2 newest kept).
    fs, root = url_to_fs(f"{data}/runs/full")
    ckpts = sorted(p for p in fs.ls(root) if _is_checkpoint(p))
    assert len(ckpts) == 2
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(ckpts[-1])} >= {"model.safetensors", "optimizer.pt", "train_state.json"}
    assert json.loads(fs.cat_file(f"{ckpts[-1]}/train_state.json"))["epoch"] == 2
    # freeze=none: every parameter moved away from its seeded initial value.
    init = build_model(TrainConfig.from_dict(config["training"]["train_config"])).state_dict()
    trained = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) > 20
    unchanged = [n for n in names if torch.equal(init[n], trained[n])]
    assert unchanged == []


def test_rerun_of_a_finished_run_reuses_it_without_training(full_run, data, tmp_path):
    fs, root = url_to_fs(f"{data}/runs/full")
    before = sorted(p for p in fs.ls(root) if _is_checkpoint(p))
    again = run_training(options(data, "full"))
    assert again["sha256"] == full_run["sha256"] and again["history"] == full_run["history"]
    assert again["resumed"]
    # Another output and threshold metric: re-exported from the last Ray checkpoint.
    other = run_training(options(data, "full", output=str(tmp_path / "v2.safetensors"), threshold_metric="maxboxacc_v2"))
    _, config = load_checkpoint(str(tmp_path / "v2.safetensors"))
    assert config["threshold"] == other["threshold"] == full_run["history"][-1]["val_threshold_maxboxacc_v2"]
    assert config["training"]["threshold_metric"] == "maxboxacc_v2"
    assert sorted(p for p in fs.ls(root) if _is_checkpoint(p)) == before  # nothing trained


def _forkserver_processes() -> set[int]:
    """Processes started by multiprocessing's forkserver (loader processes and their server)."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"multiprocessing.forkserver" in f.read():
                    pids.add(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def _no_new_forkserver_processes(before: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := _forkserver_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(full_run, data):
    # The full run decoded in each worker's thread (auto: 1 CPU a worker gives 0 processes);
    # here 1 and then 2 loader processes a worker decode: the batches, so the end point,
    # are the same.
    assert {h["loader_workers"] for h in full_run["history"]} == {0}
    before = _forkserver_processes()
    with pytest.raises(RuntimeError, match="stopped on purpose after epoch 1.*rerun with the same options"):
        run_training(options(data, "resume", stop_after_epochs=1, loader_workers=1))
    assert _no_new_forkserver_processes(before) == set()  # a failed run leaves no loader process
    fs, root = url_to_fs(f"{data}/runs/resume")
    ckpts = [p for p in fs.ls(root) if _is_checkpoint(p)]
    assert len(ckpts) == 1
    assert json.loads(fs.cat_file(f"{ckpts[0]}/train_state.json"))["epoch"] == 0
    assert not fs.exists(f"{data}/out/resume.safetensors".split("://", 1)[1])

    r = run_training(options(data, "resume", loader_workers=2))
    assert _no_new_forkserver_processes(before) == set()
    assert r["resumed"]
    assert [h["epoch"] for h in r["history"]] == [1, 2, 3]
    assert [h["loader_workers"] for h in r["history"]] == [1, 2, 2]
    # Same seed, same data order per epoch, optimizer state restored: same end point.
    for a, b in zip(r["history"], full_run["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-3)
    assert r["threshold"] == pytest.approx(full_run["threshold"], abs=0.011)
    resumed, uninterrupted = _state(r["checkpoint"]), _state(full_run["checkpoint"])
    worst = max((resumed[k].float() - uninterrupted[k].float()).abs().max().item() for k in resumed)
    assert worst < 2e-3


def test_freeze_token_trains_only_token_head_and_gated_blocks(full_run, data, tmp_path):
    # Two-stage recipe: start from the trained checkpoint, few-shot, local storage/output.
    r = run_training(options(
        data, "frozen", pretrained=full_run["checkpoint"], freeze="token", images_per_class=4, epochs=1,
        batch_size=8, storage_path=str(tmp_path / "runs"), output=str(tmp_path / "frozen.safetensors"),
    ))
    assert r["train_images"] == 4 * NUM_CLASSES and r["steps_per_epoch"] == 2
    assert os.path.exists(tmp_path / "frozen.safetensors")
    before, after = _state(full_run["checkpoint"]), _state(r["checkpoint"])
    model = create_model("sat_vit_micro_patch8_64", NUM_CLASSES, img_size=32, **MODEL_KWARGS)
    trainable = [n for n, _ in model.named_parameters() if is_token_or_head(n, model)]
    frozen = [n for n, _ in model.named_parameters() if not is_token_or_head(n, model)]
    assert {"spatial_token", "spatial_pos_embed", "head.conv.weight"} <= set(trainable)
    assert any(n.startswith("blocks.0.") for n in frozen) and "patch_embed.proj.weight" in frozen
    assert [n for n in frozen if not torch.equal(before[n], after[n])] == []
    assert [n for n in trainable if torch.equal(before[n], after[n])] == []


def test_train_run_logs_no_state_api_warning(data, capfd, tmp_path):
    # Ray Train's PlacementGroupCleaner polls the state API (served by the dashboard) about
    # once a second and warns when it cannot; the in-process cluster must answer it.
    run_training(options(data, "quiet", epochs=1, storage_path=str(tmp_path / "runs"),
                         output=str(tmp_path / "quiet.safetensors")))
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    assert [ln for ln in lines if "Failed to query Ray Train Controller" in ln] == []
    assert [ln for ln in lines if "Exception in thread PlacementGroupCleanerMonitor" in ln] == []


def _write_local(url: str, drop_labels: bool = False, drop_class: int | None = None) -> str:
    """Small local train shards: labels removed, or one class left out."""
    from pipeline.datasets.webdataset_writer import ShardWriter
    from pipeline.datasets.synthetic import iter_synthetic_samples

    with ShardWriter(url, prefix="train", max_count=100) as writer:
        for key, members in iter_synthetic_samples("train", 16, seed=0, num_classes=NUM_CLASSES):
            meta = json.loads(members["json"])
            if meta["label"] == drop_class:
                continue
            if drop_labels:
                members.pop("cls")
                meta.pop("label")
                members["json"] = json.dumps(meta).encode()
            writer.write(key, members)
    return url


def test_bad_input_fails_before_training(full_run, data, tmp_path):
    runs = tmp_path / "runs"
    local = dict(storage_path=str(runs), output=str(tmp_path / "m.safetensors"))
    nolabel = _write_local(f"{tmp_path}/nolabel/", drop_labels=True)
    with pytest.raises(TrainDataError, match="--train-shards: 16 sample.* no label"):
        run_training(options(data, "nolabel", train_shards=nolabel, **local))
    three = tmp_path / "three.safetensors"
    save_checkpoint(create_model("sat_vit_micro_patch8_64", 3, img_size=32, **MODEL_KWARGS), str(three),
                    default_config("sat_vit_micro_patch8_64", 3))
    with pytest.raises(ValueError, match="trained on 3 classes but the shards have 4"):
        run_training(options(data, "classes", pretrained=str(three), **local))
    with pytest.raises(TrainDataError, match=r"--images-per-class 2: class\(es\) 3 .*no training image"):
        run_training(options(data, "fewshot", train_shards=_write_local(f"{tmp_path}/no3/", drop_class=3),
                             images_per_class=2, **local))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="--storage-path: cannot write .*a-file/runs"):
        run_training(options(data, "storage", storage_path=str(blocker / "runs")))
    with pytest.raises(StorageError, match="--storage-path: .*bucket 'no-such-bucket' .* does not exist"):
        run_training(options(data, "bucket", storage_path="s3://no-such-bucket/runs"))
    with pytest.raises(StorageError, match="--output: cannot write"):
        run_training(options(data, "output", output=str(blocker / "m.safetensors")))
    with pytest.raises(ValueError, match=r"run 'full' .* other options \(lr: 0.003 then, 0.001 now\)"):
        run_training(options(data, "full", lr=1e-3))
    assert not runs.exists() or not any(_is_checkpoint(str(p)) for p in runs.rglob("*"))


def test_cli_parses_every_flag_and_reports_bad_storage(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    try:
        import train_sat
    finally:
        sys.path.pop(0)
    o = train_sat.parse_args([
        "--train-shards", "s3://b/t-{0..3}.tar", "--val-shards", "s3://b/v.tar", "--model", "vit_micro_patch8_64",
        "--img-size", "48", "--model-kwargs", '{"depth": 4}', "--method", "cam", "--pretrained", "p.safetensors",
        "--epochs", "5", "--batch-size", "64", "--lr", "0.01", "--schedule", "constant", "--weight-decay", "0.1",
        "--warmup-epochs", "2",
        "--alpha", "0.3", "--area-weight", "0.5", "--norm-weight", "0.2", "--spatial-loss-start", "4",
        "--spatial-loss-ramp", "3", "--backbone-lr-scale", "0.1", "--freeze", "token", "--images-per-class", "5",
        "--num-workers", "4", "--use-gpu", "--precision", "fp32", "--storage-path", "s3://b/runs", "--name", "n",
        "--seed", "7", "--output", "s3://b/m.safetensors", "--threshold-metric", "maxboxacc_v2",
        "--max-failures", "2",
    ]).settings()
    # A bare backbone gets the sat_ prefix, which --method then replaces when the job resolves it.
    assert (o["model"], o["method"], o["img_size"], o["model_kwargs"], o["epochs"], o["batch_size"], o["lr"]) == (
        "sat_vit_micro_patch8_64", "cam", 48, {"depth": 4}, 5, 64, 0.01)
    assert (o["weight_decay"], o["warmup_epochs"], o["alpha"], o["area_weight"], o["norm_weight"]) == (
        0.1, 2, 0.3, 0.5, 0.2)
    assert (o["spatial_loss_start"], o["spatial_loss_ramp"], o["backbone_lr_scale"], o["freeze"]) == (
        4, 3, 0.1, "token")
    assert (o["images_per_class"], o["num_workers"], o["use_gpu"], o["precision"], o["seed"]) == (
        5, 4, True, "fp32", 7)
    assert (o["threshold_metric"], o["max_failures"], o["name"], o["pretrained"]) == (
        "maxboxacc_v2", 2, "n", "p.safetensors")
    assert (o["schedule"], o["recipe"]) == ("constant", None)
    # As a script from the repo root: a bad storage path fails before Ray starts.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run(
        [sys.executable, "jobs/train_sat.py", "--train-shards", "x/", "--val-shards", "y/",
         "--storage-path", str(blocker / "runs"), "--output", str(tmp_path / "m.safetensors")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--storage-path: cannot write" in proc.stderr and "Traceback" not in proc.stderr


# --- recipes and precision -------------------------------------------------------------------


def _train_sat():
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    try:
        import train_sat
    finally:
        sys.path.pop(0)
    return train_sat


PATHS = ["--train-shards", "t/", "--val-shards", "v/", "--storage-path", "runs", "--output", "m.safetensors"]
CUB = dict(model="sat_deit_small_patch16_224", lr=1e-4, schedule="constant", warmup_epochs=0.0, weight_decay=0.05,
           batch_size=256, epochs=30, alpha=0.25, area_weight=1.0, norm_weight=1.0, area_mode="batch",
           spatial_loss_start=0.0, spatial_loss_ramp=0.0, backbone_lr_scale=1.0, freeze="none",
           model_kwargs={"drop_path_rate": 0.1})


def _values(o: TrainOptions, keys) -> dict:
    return {k: o.settings()[k] for k in keys}


def test_recipes_set_the_official_values_and_flags_override_them(capsys):
    parse = _train_sat().parse_args
    cub = parse(["--recipe", "cub", *PATHS])
    assert _values(cub, CUB) == CUB and cub.recipe == "cub" and cub.precision == "auto"
    imagenet = parse(["--recipe", "imagenet", *PATHS])
    assert _values(imagenet, CUB) == dict(CUB, lr=1.5e-5, batch_size=512, epochs=1, alpha=0.35)
    # An explicit flag wins; every other value stays the recipe's.
    tuned = parse(["--recipe", "cub", "--lr", "3e-4", "--model-kwargs", '{"depth": 6}', *PATHS])
    assert _values(tuned, CUB) == dict(CUB, lr=3e-4, model_kwargs={"drop_path_rate": 0.1, "depth": 6})
    demo = parse(["--recipe", "demo", *PATHS])
    assert _values(demo, RECIPES["sat"]) == RECIPES["sat"] and demo.train.schedule == "cosine"
    # No --recipe: the built-in defaults for the CPU backbones, an error for DeiT.
    assert _values(parse(PATHS), ["model", "lr", "schedule", "precision"]) == {
        "model": "sat_vit_micro_patch8_64", "lr": 1e-3, "schedule": "cosine", "precision": "auto"}
    with pytest.raises(SystemExit) as exit_:
        parse(["--model", "deit_small_patch16_224", *PATHS])
    assert exit_.value.code == 2
    assert "sat_deit_small_patch16_224 needs --recipe cub or imagenet" in capsys.readouterr().err


def test_deit_without_pretrained_warns_that_sat_fine_tunes(tmp_path, capsys):
    main = _train_sat().main
    local = ["--train-shards", str(tmp_path / "none") + "/", "--val-shards", str(tmp_path / "none") + "/",
             "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "m.safetensors")]
    assert main(["--recipe", "cub", *local]) == 2  # no shards: fails after the warning, before Ray
    err = capsys.readouterr().err
    assert "warning: sat_deit_small_patch16_224 is trained from random weights (no --pretrained)" in err
    assert "SAT fine-tunes pretrained" in err
    assert main(["--recipe", "cub", "--pretrained", "deit_small_patch16_224", *local]) == 2
    assert "warning" not in capsys.readouterr().err
    assert main(["--recipe", "demo", *local]) == 2  # the CPU model: no warning
    assert "warning" not in capsys.readouterr().err


def test_recipe_run_prints_and_stores_its_resolved_settings_and_precision(data, capsys, tmp_path):
    out = tmp_path / "cub-tiny.safetensors"
    code = _train_sat().main([
        "--recipe", "cub", "--model", "sat_vit_micro_patch8_64", "--img-size", "32",
        "--model-kwargs", json.dumps(MODEL_KWARGS), "--epochs", "1", "--batch-size", "16", "--lr", "3e-4",
        "--num-workers", "2", "--train-shards", f"{data}/train/", "--val-shards", f"{data}/val/",
        "--storage-path", str(tmp_path / "runs"), "--output", str(out),
    ])
    stdout = capsys.readouterr().out
    assert code == 0
    precision = resolve_precision("auto", "cpu")  # bf16 on a CPU with native bf16, else fp32
    settings_line = next(ln for ln in stdout.splitlines() if "settings (recipe cub)" in ln)
    assert "AdamW lr 0.0003 constant (warm-up 0 epochs), weight decay 0.05" in settings_line
    assert "drop path 0.1" in settings_line and "alpha 0.25" in settings_line
    assert f"precision {precision} (from auto)" in settings_line
    _, config = load_checkpoint(str(out))
    training = config["training"]
    assert training["recipe"] == "cub" and training["precision"] == precision
    assert training["precision_requested"] == "auto" and training["train_config"]["precision"] == precision
    s = training["settings"]
    assert (s["lr"], s["schedule"], s["warmup_epochs"], s["weight_decay"]) == (3e-4, "constant", 0.0, 0.05)
    assert (s["alpha"], s["drop_path_rate"], s["epochs"], s["batch_size"]) == (0.25, 0.1, 1, 16)
    assert (s["area_weight"], s["norm_weight"], s["area_mode"], s["freeze"]) == (1.0, 1.0, "batch", "none")
    assert s["augment"] == "Resize 37x37, RandomCrop 32, horizontal flip"  # 256/224 of the input
    assert s["precision"] == precision and s["model"] == "sat_vit_micro_patch8_64"
    history = json.loads(next((tmp_path / "runs").glob("*/satloc_result.json")).read_text())["history"]
    assert [h["lr"] for h in history] == [3e-4]  # constant: the last step's lr is the recipe's
