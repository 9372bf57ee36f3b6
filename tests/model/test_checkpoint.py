"""model/checkpoint.py and model/pretrained.py: satloc checkpoints and foreign weights."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import create_model, default_config
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint
from model.checkpoint import checkpoint_bytes, load_checkpoint_bytes, read_config
from model.pretrained import PretrainedReport, checkpoint_filter_fn, pretrained_report, read_state_dict

MICRO = "vit_micro_patch8_64"


def micro(method: str = "sat", num_classes: int = 4, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model(f"{method}_{MICRO}", num_classes, **overrides).eval()


def outputs(model, size: int = 64):
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def deit_sd() -> dict[str, torch.Tensor]:
    """A random-init timm DeiT-tiny state dict, every tensor nudged so nothing equals a fresh init."""
    torch.manual_seed(0)
    sd = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    g = torch.Generator().manual_seed(1)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def deit_files(deit_sd, tmp_path_factory) -> dict[str, str]:
    """The same weights as the official DeiT release layout and as timm-named safetensors."""
    root = tmp_path_factory.mktemp("deit")
    official = root / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": deit_sd}, str(official))
    safetensors = root / "deit_tiny.safetensors"
    save_file(deit_sd, str(safetensors))
    return {"official_pth": str(official), "timm_safetensors": str(safetensors)}


def assert_backbone_equal(model, sd: dict[str, torch.Tensor], skip=("head.",)) -> int:
    own = model.state_dict()
    compared = 0
    for key, value in sd.items():
        if key.startswith(skip):
            continue
        assert torch.equal(own[key], value), f"{key} was not loaded"
        compared += 1
    return compared


# ---------------------------------------------------------------- satloc checkpoints


@pytest.mark.parametrize("method", ["sat", "cam"])
def test_round_trip_identical_outputs(tmp_path, method):
    model = micro(method, num_classes=4, seed=1)
    config = default_config(
        f"{method}_{MICRO}", 4, class_names=["cat", "dog", "bird", "fish"], threshold=0.35,
        training={"epochs": 3, "lr": 1e-4},
    )
    url = str(tmp_path / "ckpt" / "model.safetensors")
    sha = save_checkpoint(model, url, config)
    with open(url, "rb") as f:
        data = f.read()
    assert sha == hashlib.sha256(data).hexdigest()

    loaded, loaded_config = load_checkpoint(url)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_config["sha256"] == sha
    for key in ("model", "method", "num_classes", "class_names", "threshold", "training", "mean", "std"):
        assert loaded_config[key] == config[key]
    before, after = outputs(model), outputs(loaded)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.loc_map, after.loc_map)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_round_trip_keeps_overrides_and_works_on_fsspec_urls():
    model = micro("sat", num_classes=3, seed=2, img_size=32, depth=4, reweight_blocks=2)
    config = default_config(f"sat_{MICRO}", 3, model_kwargs={"img_size": 32, "depth": 4, "reweight_blocks": 2})
    url = "memory://satloc-tests/run/model.safetensors"
    sha = save_checkpoint(model, url, config)
    loaded, loaded_config = load_checkpoint(url, expected_num_classes=3)
    assert loaded_config["model_kwargs"] == {"img_size": 32, "depth": 4, "reweight_blocks": 2}
    assert loaded_config["sha256"] == sha
    assert loaded.grid == (4, 4) and len(loaded.blocks) == 4 and loaded.reweight_blocks == 2
    assert torch.equal(outputs(model, 32).loc_map, outputs(loaded, 32).loc_map)


def test_bytes_round_trip_and_config_in_metadata():
    model = micro("cam", num_classes=2)
    config = default_config(f"cam_{MICRO}", 2, class_names=["a", "b"])
    data = checkpoint_bytes(model, config)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert json.loads(header["__metadata__"]["satloc_config"])["class_names"] == ["a", "b"]
    assert read_config(data)["num_classes"] == 2
    loaded, loaded_config = load_checkpoint_bytes(data)
    assert loaded_config["sha256"] == hashlib.sha256(data).hexdigest()
    assert torch.equal(outputs(model).logits, outputs(loaded).logits)


def test_wrong_class_count(tmp_path):
    model = micro("sat", num_classes=4)
    url = str(tmp_path / "m.safetensors")
    save_checkpoint(model, url, default_config(f"sat_{MICRO}", 4))
    with pytest.raises(ValueError, match="has 4 classes but 10 were expected"):
        load_checkpoint(url, expected_num_classes=10)
    with pytest.raises(ValueError, match="config says 5 classes but the model has 4"):
        save_checkpoint(model, str(tmp_path / "n.safetensors"), default_config(f"sat_{MICRO}", 5))
    assert not os.path.exists(tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        checkpoint_bytes(model, default_config(f"sat_{MICRO}", 4, class_names=["a", "b", "c"]))
    with pytest.raises(ValueError, match="unknown model"):
        checkpoint_bytes(model, default_config(f"sat_{MICRO}", 4) | {"model": "sat_resnet50"})


def test_non_satloc_files(tmp_path):
    plain = tmp_path / "plain.safetensors"  # safetensors, but no satloc config
    save_file({"w": torch.zeros(2)}, str(plain))
    pth = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, str(pth))
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a checkpoint at all")
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    for path in (plain, pth, text, tiny):
        with pytest.raises(ValueError, match="is not a satloc checkpoint"):
            load_checkpoint(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------- foreign weights as pretrained=


@pytest.mark.parametrize("fmt", ["official_pth", "timm_safetensors"])
def test_deit_state_dict_loads_as_pretrained(deit_sd, deit_files, fmt):
    sd, path = deit_sd, deit_files[fmt]
    torch.manual_seed(5)
    fresh = create_model("sat_deit_tiny_patch16_224", 10)
    torch.manual_seed(5)
    model = create_model("sat_deit_tiny_patch16_224", 10, pretrained=path)
    # Every backbone tensor is the file's; the old 1000-class linear head is dropped.
    assert assert_backbone_equal(model, sd) == len(sd) - 2
    # The conv head and the spatial token are the fresh ones (same seed, not the file's).
    for key in ("head.conv.weight", "head.conv.bias", "spatial_token", "spatial_pos_embed"):
        assert torch.equal(model.state_dict()[key], fresh.state_dict()[key]), key
    assert not torch.equal(model.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)


def test_pos_embed_resized_for_another_image_size(deit_sd, deit_files):
    sd = deit_sd
    model = create_model("sat_deit_tiny_patch16_224", 10, pretrained=deit_files["official_pth"], img_size=112).eval()
    assert model.grid == (7, 7) and model.pos_embed.shape == (1, 1 + 49, 192)
    # cls position kept; the 14 x 14 grid resampled to 7 x 7 (bicubic, antialiased, as timm does).
    assert torch.equal(model.pos_embed[:, :1], sd["pos_embed"][:, :1])
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(7, 7), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(model.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 49, 192))
    assert assert_backbone_equal(model, sd, skip=("head.", "pos_embed")) == len(sd) - 3
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
    assert out.logits.shape == (1, 10) and out.loc_map.shape == (1, 1, 7, 7)


def test_official_sat_release_checkpoint_loads_through_the_filter(tmp_path):
    source = micro("sat", num_classes=4, seed=11)
    renames = {"spatial_token": "loc_token", "spatial_pos_embed": "loc_embed",
               "head.conv.weight": "head.weight", "head.conv.bias": "head.bias"}
    official = {renames.get(k, k): v for k, v in source.state_dict().items()}
    official["loc_token"] = official["loc_token"].reshape(1, -1)  # 2-D in some releases
    assert official["head.weight"].ndim == 4
    path = tmp_path / "sat_official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}}, str(path))

    filtered = checkpoint_filter_fn(torch.load(str(path), weights_only=True), micro("sat", 4, seed=12))
    assert set(filtered) == set(source.state_dict())
    model = create_model(f"sat_{MICRO}", 4, pretrained=str(path)).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(outputs(model).logits, outputs(source).logits)

    # Another class count: everything but the conv head.
    torch.manual_seed(3)
    fresh = create_model(f"sat_{MICRO}", 7)
    torch.manual_seed(3)
    other = create_model(f"sat_{MICRO}", 7, pretrained=str(path))
    assert torch.equal(other.spatial_token, source.spatial_token)
    assert torch.equal(other.head.conv.weight, fresh.head.conv.weight)


def test_cam_checkpoint_seeds_sat(tmp_path):
    cam = micro("cam", num_classes=4, seed=21)
    url = str(tmp_path / "cam.safetensors")
    save_checkpoint(cam, url, default_config(f"cam_{MICRO}", 4))
    torch.manual_seed(8)
    fresh = create_model(f"sat_{MICRO}", 4)
    torch.manual_seed(8)
    sat = create_model(f"sat_{MICRO}", 4, pretrained=url)
    cam_sd = cam.state_dict()
    assert assert_backbone_equal(sat, cam_sd, skip=()) == len(cam_sd)  # backbone and same-size conv head
    assert torch.equal(sat.spatial_token, fresh.spatial_token)  # the new token starts fresh
    # A class count that differs keeps the SAT model's fresh head.
    other = create_model(f"sat_{MICRO}", 9, pretrained=url)
    assert other.head.conv.weight.shape == (9, 128, 3, 3)
    assert torch.equal(other.blocks[2].mlp.fc1.weight, cam.blocks[2].mlp.fc1.weight)


def test_mismatched_backbone_is_refused(tmp_path, deit_files):
    # DeiT-tiny (width 192) weights into the micro backbone (width 128).
    with pytest.raises(ValueError, match="has shape .* but this model needs .* same backbone"):
        create_model(f"sat_{MICRO}", 10, pretrained=deit_files["timm_safetensors"])
    empty = tmp_path / "no_backbone.safetensors"
    save_file({"something": torch.zeros(3)}, str(empty))
    with pytest.raises(ValueError, match="holds no ViT backbone weights"):
        create_model(f"sat_{MICRO}", 3, pretrained=str(empty))


# ---------------------------------------------------------------- what pretrained= dropped, said


def pretrained_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "satloc.pretrained"]


def test_deit_load_says_what_was_reinitialised_and_dropped(deit_sd, deit_files, caplog):
    caplog.set_level(logging.INFO, logger="satloc.pretrained")
    path = deit_files["official_pth"]
    model = create_model("sat_deit_tiny_patch16_224", 10, pretrained=path)
    [record] = pretrained_records(caplog)
    assert record.levelno == logging.INFO  # a DeiT's linear head never fits: the normal path
    assert record.getMessage() == (
        f"pretrained deit_tiny_patch16_224-a1311bcf.pth: {len(deit_sd) - 2} tensors loaded; "
        "head.conv.weight, head.conv.bias re-initialised (checkpoint has a linear head of 1000 classes, "
        "model a conv head of 10); spatial_token, spatial_pos_embed re-initialised (not in the checkpoint); "
        "dropped from the checkpoint: head.bias, head.weight"
    )
    report = pretrained_report(model)
    assert isinstance(report, PretrainedReport) and report.source == path
    assert report.summary() == record.getMessage()  # what the train job prints
    assert sorted(report.loaded) == sorted(k for k in deit_sd if not k.startswith("head."))
    assert report.unexpected_fresh == [] and not report.conv_head_dropped
    assert pretrained_report(create_model("sat_deit_tiny_patch16_224", 10)) is None


def test_pos_embed_resize_is_reported(deit_files, caplog):
    caplog.set_level(logging.INFO, logger="satloc.pretrained")
    model = create_model("sat_deit_tiny_patch16_224", 10, pretrained=deit_files["timm_safetensors"], img_size=128)
    [record] = pretrained_records(caplog)
    assert "; pos_embed resized 14x14 -> 8x8;" in record.getMessage()
    assert pretrained_report(model).pos_embed_resized == ((14, 14), (8, 8))
    same = create_model("sat_deit_tiny_patch16_224", 10, pretrained=deit_files["timm_safetensors"])
    assert pretrained_report(same).pos_embed_resized is None and "resized" not in pretrained_report(same).summary()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_head_of_another_class_count_is_a_warning(tmp_path, caplog, fmt):
    source = micro("sat", num_classes=200, seed=4)
    path = str(tmp_path / f"sat200.{fmt}")
    if fmt == "safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save({"model": source.state_dict()}, path)
    caplog.set_level(logging.INFO, logger="satloc.pretrained")
    model = create_model(f"sat_{MICRO}", 1000, pretrained=path)
    [record] = pretrained_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"pretrained sat200.{fmt}: {len(source.state_dict()) - 2} tensors loaded; "
        "head.conv.weight, head.conv.bias re-initialised (checkpoint has 200 classes, model 1000)"
    )
    assert pretrained_report(model).conv_head_dropped
    # The same class count: everything loaded, nothing to warn about.
    caplog.clear()
    create_model(f"sat_{MICRO}", 200, pretrained=path)
    [record] = pretrained_records(caplog)
    assert record.levelno == logging.INFO
    assert record.getMessage() == f"pretrained sat200.{fmt}: {len(source.state_dict())} tensors loaded"


def test_missing_backbone_tensors_and_unknown_keys_are_reported(tmp_path, caplog):
    sd = dict(micro("cam", num_classes=4, seed=6).state_dict())
    del sd["blocks.1.mlp.fc1.weight"]
    sd["pre_logits.fc.weight"] = torch.zeros(2, 2)  # no place in a SAT model
    sd["dist_token"] = torch.zeros(1, 1, 128)
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    caplog.set_level(logging.INFO, logger="satloc.pretrained")
    model = create_model(f"sat_{MICRO}", 4, pretrained=str(path))
    [record] = pretrained_records(caplog)
    assert record.levelno == logging.WARNING  # a backbone tensor stayed at its fresh init
    message = record.getMessage()
    assert message == (
        f"pretrained partial.safetensors: {len(sd) - 2} tensors loaded; spatial_token, spatial_pos_embed, "
        "blocks.1.mlp.fc1.weight re-initialised (not in the checkpoint); "
        "dropped from the checkpoint: dist_token, pre_logits.fc.weight"  # sorted
    )
    report = pretrained_report(model)
    assert report.unexpected_fresh == ["blocks.1.mlp.fc1.weight"]
    assert set(report.dropped) == {"pre_logits.fc.weight", "dist_token"}


class _Payload:
    """Unpickling this runs a shell command: what a hostile .pth can do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > '{self.marker}'",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    sd = {k: v for k, v in micro("sat").state_dict().items()}
    torch.save({"model": sd, "extra": _Payload(str(marker))}, str(path))
    assert not marker.exists()  # saving did not run it
    with pytest.raises(ValueError, match="refusing to load .*evil.pth"):
        read_state_dict(str(path))
    with pytest.raises(ValueError, match="refusing to load"):
        create_model(f"sat_{MICRO}", 4, pretrained=str(path))
    with pytest.raises(ValueError, match="not a satloc checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists(), "the pickle payload ran"


def test_pretrained_true_asks_timm_for_the_same_backbone(monkeypatch, deit_sd):
    asked = []
    real_create = timm.create_model

    def fake_hub(name, pretrained=False, **kwargs):  # stands in for the model hub
        asked.append((name, pretrained))
        model = real_create(name, pretrained=False, **kwargs)
        model.load_state_dict(deit_sd)
        return model

    monkeypatch.setattr(timm, "create_model", fake_hub)
    model = create_model("sat_deit_tiny_patch16_224", 10, pretrained=True)
    assert asked == [("deit_tiny_patch16_224", True)]
    assert assert_backbone_equal(model, deit_sd) == len(deit_sd) - 2

    def no_hub(name, pretrained=False, **kwargs):
        raise OSError("no route to huggingface.co")

    monkeypatch.setattr(timm, "create_model", no_hub)
    with pytest.raises(ValueError, match="could not fetch timm's pretrained deit_tiny_patch16_224.*local file"):
        create_model("sat_deit_tiny_patch16_224", 10, pretrained=True)
