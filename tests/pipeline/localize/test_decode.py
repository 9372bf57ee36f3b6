"""pipeline/localize/decode.py: JPEGs decoded in batches on a device, everything else per
sample on the CPU, with error rows exactly the CPU path's.

The batched path runs here on ``device="cpu"`` (torchvision's CPU ``decode_jpeg``, the same
batches and fallbacks as nvJPEG on CUDA). Tests marked ``cuda`` run the same checks on a GPU
(``pytest -m cuda``) and skip, saying so, where there is none.

Measured on this machine (textured ~500x375 JPEGs, quality 90): the batched CPU decode equals
PIL's exactly (max 0); the model input (224 px) differs from the CPU path's by at most 1 level,
mean 0.0015 (torch's uint8 antialiased bilinear is PIL's algorithm); the float32 resize that
runs on CUDA by at most 1 level, mean 0.15. The tolerances below (max 2, mean 0.05 / 0.3) pass
with margin and fail on a swapped colour order, a flip or a wrong scale (tens of levels).
"""
from __future__ import annotations

import copy
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.checkpoint import default_config
from model.factory import create_model
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint
from pipeline.data.preprocess import ResizeCrop
from pipeline.data.reader import Sample, read_samples
from pipeline.localize import decode
from pipeline.localize.decode import BatchDecoder, cpu_reason, prepare_sample, resize_on_device, resolve_decode
from pipeline.localize.messages import ShardJob, ShardResult
from pipeline.localize.rows import RowSettings
from pipeline.localize.worker import ShardLocalizer, WorkerSettings

MODEL = "sat_vit_micro_patch8_64"
cuda = pytest.mark.cuda


# --- data -----------------------------------------------------------------------------------


def photo(rng: np.random.Generator, width: int = 500, height: int = 375, mode: str = "RGB", **save) -> bytes:
    """A textured, photo-like JPEG (smooth colour fields plus noise), quality 90."""
    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    base += rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


def png(rng: np.random.Generator, width: int = 90, height: int = 70) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rotated(rng: np.random.Generator) -> bytes:
    """A JPEG whose EXIF orientation (6) asks for a 90-degree turn."""
    image = Image.open(io.BytesIO(photo(rng, 100, 60)))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def bomb(rng: np.random.Generator) -> bytes:
    """A small JPEG whose header claims 65535 x 65535 pixels (over PIL's decompression-bomb limit)."""
    data = bytearray(photo(rng, 64, 48))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = b"\xff\xff\xff\xff"
    return bytes(data)


def mask(width: int, height: int) -> bytes:
    arr = np.zeros((height, width), np.uint8)
    arr[height // 4: height // 2, width // 4: width // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def mixed_members(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Good JPEGs (sides under 128, so PIL does not draft them for a 64-px model) among every
    kind of sample the CPU path treats specially."""
    good = photo(rng, 120, 90)
    corrupt = bytearray(photo(rng, 100, 80))
    corrupt[len(corrupt) // 3: len(corrupt) // 3 + 400] = rng.integers(0, 255, 400, dtype=np.uint8).tobytes()
    members = [(f"good{i}.jpg", photo(rng, int(rng.integers(60, 127)), int(rng.integers(60, 127)))) for i in range(5)]
    members += [
        ("png.png", png(rng)),
        ("cmyk.jpg", photo(rng, 80, 60, mode="CMYK")),
        ("exif.jpg", rotated(rng)),
        ("grey.jpg", photo(rng, 90, 70, mode="L")),
        ("truncated.jpg", good[: len(good) // 2]),
        ("corrupt.jpg", bytes(corrupt)),
        ("zero.jpg", b""),
        ("bomb.jpg", bomb(rng)),
        ("masked.jpg", good), ("masked.mask.png", mask(120, 90)),
        ("badmask.jpg", good), ("badmask.mask.png", mask(30, 20)),
        ("progressive.jpg", photo(rng, 100, 75, progressive=True)),
        ("noimage.json", json.dumps({"label": 1}).encode()),
    ]
    members += [(f"tail{i}.jpg", photo(rng, 110, 100)) for i in range(4)]
    return [(n, d) for n, d in members] + [(n.replace(".jpg", ".cls"), b"3") for n, _ in members[:2]]


def write_tar(path, members) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def raw(key: str, data: bytes, mask_bytes: bytes | None = None) -> Sample:
    return Sample(key=key, shard="s.tar", image_bytes=data, mask_bytes=mask_bytes)


def pil_pixels(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = (a.cpu().int() - b.cpu().int()).abs()
    return int(d.max()), float(d.float().mean())


def submit_now(fn, *args):
    """A stand-in for ``pool.submit`` that runs the CPU path at once."""
    from concurrent.futures import Future

    future: Future = Future()
    future.set_result(fn(*args))
    return future


def resolved(items) -> list:
    return [item.result() if hasattr(item, "result") else item for item in items]


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [photo(rng, int(rng.integers(300, 500)), int(rng.integers(240, 400))) for _ in range(6)]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    torch.manual_seed(0)
    save_checkpoint(create_model(MODEL, 10), str(root / "m.safetensors"), default_config(MODEL, 10, model_kwargs={}))
    model, config = load_checkpoint(str(root / "m.safetensors"))
    shard = write_tar(root / "mixed-000000.tar", mixed_members(np.random.default_rng(7)))
    return {"root": root, "model": model, "config": config, "shard": shard}


def localizer(micro, device="cpu", resize_crop=None, **settings) -> ShardLocalizer:
    rows = RowSettings(threshold=0.4, model_sha256=micro["config"]["sha256"], resize_crop=resize_crop)
    settings = WorkerSettings(**{"batch_size": 4, "decode_threads": 2, **settings})
    # A copy: ShardLocalizer moves its model to its device, and CPU and CUDA ones coexist.
    return ShardLocalizer(copy.deepcopy(micro["model"]), micro["config"], settings, rows, device)


# --- pixels: batched decode against PIL and the CPU path ------------------------------------------


def test_batched_full_size_decode_equals_pil(photos):
    decoder = BatchDecoder(224, "cpu")
    images = decoder._decode([torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in photos])
    for data, image in zip(photos, images):
        assert image.shape == pil_pixels(data).shape
        worst, mean = diff(image, pil_pixels(data))
        assert worst <= 2 and mean <= 0.5, (worst, mean)


@pytest.mark.parametrize("frame", [None, ResizeCrop(256, 224)], ids=["whole", "resize-crop"])
def test_batched_model_input_equals_the_cpu_path(photos, frame):
    decoder = BatchDecoder(224, "cpu", frame)
    out = resolved(decoder.decode_chunk([raw(f"k{i}", p) for i, p in enumerate(photos)], submit_now))
    assert decoder.counts == {"batched": len(photos), "retried alone": 0, "cpu": 0}
    for i, (data, prepared) in enumerate(zip(photos, out)):
        reference = prepare_sample(raw(f"k{i}", data), 224, frame)
        assert prepared.pixels.shape == (3, 224, 224) and prepared.pixels.dtype == torch.uint8
        assert (prepared.sample.width, prepared.sample.height) == (reference.sample.width, reference.sample.height)
        assert prepared.sample.key == f"k{i}" and prepared.sample.image_bytes is None
        worst, mean = diff(prepared.pixels, reference.pixels)
        assert worst <= 2 and mean <= 0.05, (worst, mean)


def test_the_float_resize_that_runs_on_cuda_stays_within_one_level(photos):
    for data in photos[:3]:
        reference = prepare_sample(raw("k", data), 224).pixels
        image = pil_pixels(data)
        as_float = torch.nn.functional.interpolate(
            image[None].float(), size=(224, 224), mode="bilinear", antialias=True, align_corners=False
        )[0].round().clamp(0, 255).to(torch.uint8)
        worst, mean = diff(as_float, reference)
        assert worst <= 2 and mean <= 0.3, (worst, mean)
        assert torch.equal(resize_on_device(image, 224), resize_on_device(image, 224))
    # a wrong colour order or a flip is caught by these tolerances
    swapped = prepare_sample(raw("k", photos[0]), 224).pixels.flip(0)
    assert diff(swapped, prepare_sample(raw("k", photos[0]), 224).pixels)[1] > 5


# --- routing and fallbacks -----------------------------------------------------------------------


def test_only_plain_jpegs_are_batch_decoded():
    rng = np.random.default_rng(1)
    good = photo(rng, 90, 70)
    reasons = {
        "rgb": cpu_reason(raw("a", good)),
        "grey": cpu_reason(raw("a", photo(rng, 90, 70, mode="L"))),
        "masked": cpu_reason(raw("a", good, mask(90, 70))),
        "png": cpu_reason(raw("a", png(rng))),
        "cmyk": cpu_reason(raw("a", photo(rng, 80, 60, mode="CMYK"))),
        "exif": cpu_reason(raw("a", rotated(rng))),
        "truncated": cpu_reason(raw("a", good[: len(good) // 2])),
        "zero": cpu_reason(raw("a", b"")),
        "bomb": cpu_reason(raw("a", bomb(rng))),
        "badmask": cpu_reason(raw("a", good, mask(10, 10))),
        "error": cpu_reason(Sample(key="a", shard="s", error="no image member")),
    }
    assert reasons["rgb"] is None and reasons["grey"] is None and reasons["masked"] is None
    assert reasons["png"] == reasons["zero"] == "not a JPEG"
    assert reasons["cmyk"] == "mode CMYK" and reasons["exif"] == "EXIF orientation"
    assert "end-of-image" in reasons["truncated"] and reasons["badmask"] == "mask"
    assert reasons["bomb"] == "header: DecompressionBombError" and reasons["error"] == "no image to decode"


def test_a_refused_batch_is_retried_sample_by_sample_then_on_cpu(photos, monkeypatch):
    """nvJPEG refuses a whole call for one file it cannot take: the others are decoded alone
    on the device, the refused one by the CPU path (here PIL decodes it fine)."""
    refused = photos[2]
    decoder = BatchDecoder(224, "cpu")
    real = decoder._decode

    def picky(tensors):
        if any(bytes(t.numpy()) == refused for t in tensors):
            raise RuntimeError("nvjpeg: unsupported")
        return real(tensors)

    monkeypatch.setattr(decoder, "_decode", picky)
    cpu_calls = []

    def submit(fn, *args):
        cpu_calls.append(args[0].key)
        return submit_now(fn, *args)

    out = resolved(decoder.decode_chunk([raw(f"k{i}", p) for i, p in enumerate(photos)], submit))
    assert cpu_calls == ["k2"]
    assert decoder.counts == {"batched": 0, "retried alone": len(photos) - 1, "cpu": 1}
    assert [p.sample.key for p in out] == [f"k{i}" for i in range(len(photos))]
    assert torch.equal(out[2].pixels, prepare_sample(raw("k2", refused), 224).pixels)
    assert all(p.pixels is not None and p.sample.ok for p in out)


def test_whole_tables_equal_between_cpu_and_batched_decoding(micro, tmp_path):
    """Every row of a shard mixing good JPEGs with PNG, CMYK, EXIF-rotated, grey, truncated,
    corrupt, zero-byte, bomb-sized, masked and mask-mismatched samples: the same keys, status,
    errors, sizes, labels, maps and boxes whichever path decoded them."""
    tables = {}
    for mode in ("cpu", "batched"):
        loc = localizer(micro, decode=mode)
        result = loc.localize(ShardJob(micro["shard"], str(tmp_path / f"{mode}.parquet")))
        loc.close()
        assert result.decode == mode
        tables[mode] = pq.read_table(tmp_path / f"{mode}.parquet")
        if mode == "batched":
            assert loc.decoder.counts["batched"] + loc.decoder.counts["retried alone"] >= 10
            assert result.decode_fallbacks == loc.decoder.counts["cpu"] >= 9
    cpu, batched = tables["cpu"].to_pylist(), tables["batched"].to_pylist()
    assert [r["key"] for r in cpu] == [r["key"] for r in batched]
    by_key = {r["key"]: r for r in cpu}
    statuses = {r["key"]: r["status"] for r in cpu}
    assert statuses["truncated"] == statuses["zero"] == statuses["bomb"] == statuses["badmask"] == "error"
    assert statuses["noimage"] == "error" and "DecompressionBombError" in by_key["bomb"]["error"]
    assert all(statuses[k] == "ok" for k in ("png", "cmyk", "exif", "grey", "masked", "progressive"))
    assert (by_key["exif"]["width"], by_key["exif"]["height"]) == (60, 100)  # turned by its EXIF orientation
    assert_same_rows(cpu, batched)


# Pixels differ by at most 1 level (module docstring): maps, labels and box corners come out
# the same (measured: maps equal to the level), scores move in the 4th decimal.
FLOAT_FIELDS = ("score", "topk_scores", "fg_ratio", "boxes")


def assert_same_rows(cpu: list[dict], batched: list[dict], map_levels: int = 1) -> None:
    assert len(cpu) == len(batched)
    for a, b in zip(cpu, batched):
        assert {k: v for k, v in a.items() if k not in FLOAT_FIELDS + ("loc_map",)} == {
            k: v for k, v in b.items() if k not in FLOAT_FIELDS + ("loc_map",)
        }
        if a["status"] == "error":
            assert a == b
            continue
        assert max(abs(x - y) for x, y in zip(a["loc_map"], b["loc_map"])) <= map_levels, a["key"]
        assert b["score"] == pytest.approx(a["score"], abs=2e-3) and b["fg_ratio"] == pytest.approx(a["fg_ratio"], abs=0.02)
        assert [(x["x0"], x["y0"], x["x1"], x["y1"]) for x in a["boxes"]] == [
            (x["x0"], x["y0"], x["x1"], x["y1"]) for x in b["boxes"]
        ], a["key"]


def test_resize_crop_frame_tables_equal_too(micro, tmp_path):
    tables = []
    for mode in ("cpu", "batched"):
        loc = localizer(micro, resize_crop=ResizeCrop(72, 64), decode=mode)
        loc.localize(ShardJob(micro["shard"], str(tmp_path / f"{mode}.parquet")))
        loc.close()
        tables.append(pq.read_table(tmp_path / f"{mode}.parquet").to_pylist())
    assert_same_rows(*tables)


def test_batched_stream_keeps_shard_order_and_every_sample(micro):
    loc = localizer(micro, decode="batched", batch_size=3)
    from pipeline.localize.worker import batch_prepared_samples

    keys = [p.sample.key for p in batch_prepared_samples(micro["shard"], loc.decoder, loc.pool, loc.device_pool, 3, 2)]
    loc.close()
    assert keys == [s.key for s in read_samples(micro["shard"], decode=False)]


# --- settings and logs --------------------------------------------------------------------------------


def test_auto_decodes_in_batches_only_on_cuda_and_gpu_needs_cuda():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    assert resolve_decode("auto", cpu) == "cpu" and resolve_decode("auto", gpu) == "batched"
    assert resolve_decode("gpu", gpu) == "batched" and resolve_decode("cpu", gpu) == "cpu"
    assert resolve_decode("batched", cpu) == "batched"
    with pytest.raises(ValueError, match="--decode gpu needs a CUDA device and this actor runs on cpu"):
        resolve_decode("gpu", cpu)
    with pytest.raises(ValueError, match="--decode must be one of auto, cpu, gpu"):
        resolve_decode("nvjpeg", cpu)


def test_worker_resolves_its_decode_and_refuses_gpu_without_cuda(micro):
    assert localizer(micro).decode == "cpu" and localizer(micro, decode="auto").decode == "cpu"
    with pytest.raises(ValueError, match="--decode gpu needs a CUDA device"):
        localizer(micro, decode="gpu")


def test_cpu_batches_are_not_pinned_without_cuda(micro):
    loc = localizer(micro)
    batch = loc.batch_pixels([torch.zeros(3, 64, 64, dtype=torch.uint8)] * 2)
    assert batch.shape == (2, 3, 64, 64) and not batch.is_pinned()
    with pytest.raises(ValueError, match="image 1 is"):
        loc.batch_pixels([torch.zeros(3, 64, 64, dtype=torch.uint8), torch.zeros(3, 32, 32, dtype=torch.uint8)])
    loc.close()


def test_shard_line_says_which_side_bounds_it():
    # Imported here: the scheduler imports Ray, which the GPU check's machine may lack
    # (bench/gpu_check.sh runs this file's cuda tests there).
    from pipeline.localize.scheduler import ProgressLine, shard_timing

    r = ShardResult("s3://b/a.tar", "o", rows=10, errors=1, seconds=2.0, decode_wait_seconds=1.5,
                    model_seconds=0.5, decode="batched", decode_fallbacks=2)
    assert shard_timing(r) == (
        "decode wait 1.50s, model 0.50s (model busy 25%), decode batched (2 on CPU): "
        "decode-bound (give actors more CPUs, or --decode gpu on GPU actors)"
    )
    r = ShardResult("a.tar", "o", rows=5, decode_wait_seconds=0.1, model_seconds=0.9, decode="cpu")
    assert shard_timing(r).endswith("(model busy 90%), decode cpu: model-bound")
    out = io.StringIO()
    ProgressLine(1, out).shard_done(r, 3)
    assert out.getvalue().startswith("[localize] shard a.tar on actor 3: 5 images, 0 errors in 0.0s | decode wait")


def test_decode_module_names_its_choices():
    assert decode.DECODE_CHOICES == ("auto", "cpu", "gpu")


# --- CUDA only (pytest -m cuda on a GPU machine; skipped with the reason elsewhere) -----------


def _cuda() -> torch.device:
    if not torch.cuda.is_available():  # the marker skips first; this guards a direct call
        pytest.skip("cuda: needs a CUDA GPU, none on this machine")
    return torch.device("cuda", 0)


@cuda
def test_cuda_gpu_decode_equals_cpu_decode_within_two_levels(photos):
    device = _cuda()
    rng = np.random.default_rng(3)
    colour = list(photos) + [photo(rng, 500, 375, subsampling=0)]  # 4:2:0 (PIL's default) and 4:4:4
    jpegs = colour + [photo(rng, 333, 500, mode="L")]
    decoder = BatchDecoder(224, device)
    images = decoder._decode([torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in colour])
    for data, image in zip(colour, images):
        assert image.device.type == "cuda" and image.shape == pil_pixels(data).shape
        d = (image.cpu().int() - pil_pixels(data).int()).abs()
        within = float((d <= 2).float().mean())
        assert within >= 0.99 and float(d.float().mean()) <= 1.0, (int(d.max()), float(d.float().mean()), within)
    out = resolved(decoder.decode_chunk([raw(f"k{i}", p) for i, p in enumerate(jpegs)], submit_now))
    # every JPEG here decoded on the GPU (grey too: in the batch, or alone if nvJPEG refused the mix)
    assert decoder.counts["cpu"] == 0 and decoder.counts["batched"] + decoder.counts["retried alone"] >= len(jpegs)
    for i, (data, prepared) in enumerate(zip(jpegs, out)):
        assert prepared.pixels.device.type == "cuda"
        d = (prepared.pixels.cpu().int() - prepare_sample(raw("k", data), 224).pixels.int()).abs()
        within = float((d <= 2).float().mean())
        assert within >= 0.999 and float(d.float().mean()) <= 0.5, (i, int(d.max()), float(d.float().mean()), within)


@cuda
def test_cuda_whole_tables_match_cpu_decoding_on_the_mixed_shard(micro, tmp_path):
    device = _cuda()
    tables = {}
    for mode in ("cpu", "gpu"):
        loc = localizer(micro, device=device, decode=mode)
        loc.localize(ShardJob(micro["shard"], str(tmp_path / f"{mode}.parquet")))
        loc.close()
        tables[mode] = pq.read_table(tmp_path / f"{mode}.parquet").to_pylist()
    assert [(r["key"], r["status"], r["error"], r["width"], r["height"]) for r in tables["cpu"]] == [
        (r["key"], r["status"], r["error"], r["width"], r["height"]) for r in tables["gpu"]
    ]
    for a, b in zip(tables["cpu"], tables["gpu"]):
        if a["status"] == "ok":
            assert max(abs(x - y) for x, y in zip(a["loc_map"], b["loc_map"])) <= 8, a["key"]


@cuda
def test_cuda_boxes_equal_cpu_boxes(micro, tmp_path, monkeypatch):
    """fp32 on the GPU (TF32 off, so only float rounding differs) against fp32 on the CPU, the
    same CPU decode: the same labels, maps within a level, box corners within a pixel."""
    from model.boxes import boxes_from_maps

    device = _cuda()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    tables = {}
    for name, dev in (("cpu", "cpu"), ("cuda", device)):
        loc = localizer(micro, device=dev, decode="cpu")
        loc.localize(ShardJob(micro["shard"], str(tmp_path / f"{name}.parquet")))
        loc.close()
        tables[name] = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
    for a, b in zip(tables["cpu"], tables["cuda"]):
        assert (a["key"], a["status"], a["error"], a["label"]) == (b["key"], b["status"], b["error"], b["label"])
        if a["status"] == "ok":
            assert max(abs(x - y) for x, y in zip(a["loc_map"], b["loc_map"])) <= 1, a["key"]
            for box_a, box_b in zip(a["boxes"], b["boxes"]):
                assert all(abs(box_a[k] - box_b[k]) <= 1 for k in ("x0", "y0", "x1", "y1")), a["key"]
    # post-processing takes maps on either device and gives the same boxes
    maps = torch.rand(4, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    sizes = [(500, 375), (375, 500), (224, 224), (640, 480)]
    for x, y in zip(boxes_from_maps(maps, sizes, 0.4), boxes_from_maps(maps.to(device), sizes, 0.4)):
        assert torch.equal(x, y)


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_maps_stay_close_to_fp32_on_cpu(micro, tmp_path, precision):
    device = _cuda()
    cpu = localizer(micro)
    gpu = localizer(micro, device=device, precision=precision, decode="gpu")
    cpu.localize(ShardJob(micro["shard"], str(tmp_path / "cpu.parquet")))
    gpu.localize(ShardJob(micro["shard"], str(tmp_path / "gpu.parquet")))
    cpu.close()
    gpu.close()
    a = pq.read_table(tmp_path / "cpu.parquet").to_pylist()
    b = pq.read_table(tmp_path / "gpu.parquet").to_pylist()
    assert [r["status"] for r in a] == [r["status"] for r in b]
    worst = max(abs(x - y) for ra, rb in zip(a, b) if ra["status"] == "ok" for x, y in zip(ra["loc_map"], rb["loc_map"]))
    assert worst <= 8, worst


@cuda
def test_cuda_batches_from_cpu_are_pinned(micro):
    device = _cuda()
    loc = localizer(micro, device=device)
    batch = loc.batch_pixels([torch.zeros(3, 64, 64, dtype=torch.uint8)] * 2)
    assert batch.is_pinned() and batch.device.type == "cpu"
    on_device = loc.batch_pixels([torch.zeros(3, 64, 64, dtype=torch.uint8, device=device)] * 2)
    assert on_device.device.type == "cuda"
    loc.close()


@cuda
def test_cuda_actor_decodes_on_its_gpu(micro, tmp_path):
    """The job on a one-GPU Ray cluster: the actor runs on cuda:0 and --decode auto batches there."""
    import shutil
    import tempfile

    _cuda()
    ray = pytest.importorskip("ray", reason="cuda actor test: Ray is not installed on this machine")
    from pipeline.localize.run import LocalizeConfig, run_localize

    checkpoint = str(micro["root"] / "m.safetensors")
    temp = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        out = io.StringIO()
        summary = run_localize(LocalizeConfig(shards=micro["shard"], checkpoint=checkpoint,
                                              output=str(tmp_path / "out"), gpus_per_actor=1, batch_size=4), out=out)
        assert summary.exit_code == 0
        info = summary.actors[0]["info"]
        assert info["device"] == "cuda:0" and info["decode"] == "batched", info
        assert "decode batched" in out.getvalue() and "decode wait" in out.getvalue()
    finally:
        if started:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
