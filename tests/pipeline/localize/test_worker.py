"""pipeline/localize/worker.py without Ray: one shard -> one Parquet file."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest
import torch

from model.checkpoint import default_config
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint
from model.factory import create_model
from pipeline.localize.rows import RowSettings
from model.precision import autocast_for
from pipeline.localize.worker import ShardLocalizer, WorkerSettings, prepared_samples
from pipeline.results.parquet import output_counts, written_by
from pipeline.data.reader import read_samples
from pipeline.localize.messages import ShardJob
from pipeline.datasets.synthetic import write_synthetic_shards

MODEL = "sat_vit_micro_patch8_64"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    shard = write_synthetic_shards(str(root / "shards"), "w", 20, seed=1, shard_size=20)[0]
    torch.manual_seed(0)
    save_checkpoint(create_model(MODEL, 10), str(root / "m.safetensors"), default_config(MODEL, 10, model_kwargs={}))
    model, config = load_checkpoint(str(root / "m.safetensors"))
    return {"root": root, "shard": shard, "model": model, "config": config}


def _localizer(setup, **kw) -> ShardLocalizer:
    settings = WorkerSettings(**{"batch_size": 6, "decode_threads": 2, **kw})
    rows = RowSettings(threshold=0.4, model_sha256=setup["config"]["sha256"])
    return ShardLocalizer(setup["model"], setup["config"], settings, rows)


def test_decoded_samples_keep_shard_order_with_several_threads(setup):
    with ThreadPoolExecutor(3) as pool:
        keys = [p.sample.key for p in prepared_samples(setup["shard"], 64, pool, max_pending=4)]
        assert keys == [s.key for s in read_samples(setup["shard"], decode=False)]
        first = next(iter(prepared_samples(setup["shard"], 64, pool, max_pending=4)))
    assert first.pixels.shape == (3, 64, 64) and first.pixels.dtype == torch.uint8
    assert first.sample.image is None and first.sample.width == 64


def test_reader_thread_stops_when_the_consumer_gives_up(setup):
    before = threading.active_count()
    with ThreadPoolExecutor(1) as pool:
        stream = prepared_samples(setup["shard"], 64, pool, max_pending=2)
        next(stream)
        stream.close()  # the generator's finally stops and joins the reader
    time.sleep(0.1)
    assert threading.active_count() <= before


def test_missing_shard_raises_in_the_consumer(setup, tmp_path):
    with ThreadPoolExecutor(1) as pool, pytest.raises(FileNotFoundError, match="does not exist"):
        list(prepared_samples(str(tmp_path / "nope.tar"), 64, pool, max_pending=2))


def test_localize_writes_one_file_and_skips_it_next_time(setup, tmp_path):
    loc = _localizer(setup)
    out = str(tmp_path / "w.parquet")
    first = loc.localize(ShardJob(setup["shard"], out, write_token="t1"))
    assert (first.rows, first.errors, first.skipped) == (20, 0, False)
    assert first.bytes_written > 0 and first.model_seconds > 0 and loc.images_done == 20
    table = pq.read_table(out)
    assert table.num_rows == 20 and table["key"].to_pylist() == [f"w_{i:07d}" for i in range(20)]
    assert written_by(out) == "t1" and output_counts(out) == (20, 0)
    mtime = (tmp_path / "w.parquet").stat().st_mtime_ns

    again = loc.localize(ShardJob(setup["shard"], out))
    assert again.skipped and again.rows == 20 and (tmp_path / "w.parquet").stat().st_mtime_ns == mtime
    # --overwrite: a file from another run is redone; one from this run's earlier try is not.
    same_run = loc.localize(ShardJob(setup["shard"], out, overwrite=True, write_token="t1"))
    assert same_run.skipped
    redo = loc.localize(ShardJob(setup["shard"], out, overwrite=True, write_token="t2"))
    assert not redo.skipped and written_by(out) == "t2"
    loc.close()


def test_bf16_maps_stay_close_and_fp16_needs_cuda(setup, tmp_path):
    fp32 = _localizer(setup)
    bf16 = _localizer(setup, precision="bf16")
    a = fp32.localize(ShardJob(setup["shard"], str(tmp_path / "a.parquet")))
    b = bf16.localize(ShardJob(setup["shard"], str(tmp_path / "b.parquet")))
    assert a.rows == b.rows == 20
    maps_a = pq.read_table(tmp_path / "a.parquet")["loc_map"].to_pylist()
    maps_b = pq.read_table(tmp_path / "b.parquet")["loc_map"].to_pylist()
    diff = max(abs(x - y) for ma, mb in zip(maps_a, maps_b) for x, y in zip(ma, mb))
    assert diff <= 4  # bf16 maps stay within a few quantisation steps
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        autocast_for("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        _localizer(setup, precision="fp16")


def test_hostile_samples_cost_only_their_own_rows(setup, tmp_path):
    """Issue 14: each of these lost the whole shard (or a sample) before; now one row per
    input sample, good ones localized, labels outside the 10 classes kept and counted."""
    import io
    import json
    import tarfile

    from tarfixtures import good_sample, image_bytes

    members = [
        *good_sample("a", label=3),
        ("b.cls", b"99999999999999999999"), ("b.jpg", image_bytes()),
        ("c.cls", b"3000000000"), ("c.jpg", image_bytes()),
        ("d.jpg", image_bytes()), ("d.json", json.dumps({"label": 1e30}).encode()),
        ("e.jpg", image_bytes()), ("e.json", b"[" * 100_000 + b"]" * 100_000),
        ("f.jpg", image_bytes()), ("f.json", b'{"boxes": [[0, 0, NaN, 4]]}'),
        *good_sample("g", label=-7), *good_sample("g", label=12),  # the same key twice in a row
        ("link.jpg", None),  # a sample made only of a symbolic link
        ("h\udcff.jpg", image_bytes()),  # a name that is not UTF-8
        *good_sample("z", label=12),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "a.jpg"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    shard = tmp_path / "hostile.tar"
    shard.write_bytes(buf.getvalue())
    out = str(tmp_path / "hostile.parquet")
    loc = _localizer(setup)
    result = loc.localize(ShardJob(str(shard), out))
    loc.close()
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == ["a", "b", "c", "d", "e", "f", "g", "g", "link", "h\\udcff", "z"]
    assert [r["status"] for r in rows] == ["ok"] + ["error"] * 5 + ["ok", "error", "error", "error", "ok"]
    assert "member 'b.cls'" in rows[1]["error"] and "member 'e.json' nests" in rows[4]["error"]
    assert "occurs again" in rows[7]["error"] and "symbolic link" in rows[8]["error"]
    assert "row for sample 'h\\udcff' cannot be stored: key" in rows[9]["error"]
    assert [r["gt_label"] for r in rows if r["status"] == "ok"] == [3, -7, 12]
    assert (result.rows, result.errors) == (11, 8)
    assert result.gt_labels_outside == 2 and result.gt_label_range == (-7, 12)


def test_a_zero_byte_or_cut_output_is_redone_not_skipped(setup, tmp_path):
    loc = _localizer(setup)
    out = tmp_path / "w.parquet"
    loc.localize(ShardJob(setup["shard"], str(out)))
    whole = out.read_bytes()
    for broken in (b"", whole[: len(whole) // 2]):
        out.write_bytes(broken)
        result = loc.localize(ShardJob(setup["shard"], str(out)))
        assert not result.skipped and result.rows == 20 and pq.read_table(out).num_rows == 20
    loc.close()
