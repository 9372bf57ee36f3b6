"""pipeline/localize/worker.py on a DINOv2-shaped model (registers, patch 14, a 16 x 16 grid at
224 px): one shard -> one Parquet file whose metadata records the 16 x 16 map grid."""
from __future__ import annotations

import pyarrow.parquet as pq
import torch

from model.checkpoint import default_config
from model.factory import create_model
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint
from pipeline.datasets.synthetic import write_synthetic_shards
from pipeline.localize.messages import ShardJob
from pipeline.localize.rows import RowSettings
from pipeline.localize.worker import ShardLocalizer, WorkerSettings, grid_shape
from pipeline.results.schema import loc_map_shape

MODEL = "sat_dinov2_small_patch14_reg4"
TINY = dict(depth=3, embed_dim=24, num_heads=2)  # the DINOv2-S/14 layout at 224 px, narrow and shallow


def test_dinov2_reg4_model_writes_16x16_maps(tmp_path):
    shard = write_synthetic_shards(str(tmp_path / "shards"), "d", 6, seed=2, shard_size=6)[0]
    torch.manual_seed(0)
    model = create_model(MODEL, 10, **TINY)
    save_checkpoint(model, str(tmp_path / "m.safetensors"), default_config(MODEL, 10, model_kwargs=TINY))
    model, config = load_checkpoint(str(tmp_path / "m.safetensors"))
    assert grid_shape(config) == (16, 16) == model.grid and model.num_prefix_tokens == 5
    rows = RowSettings(threshold=0.4, model_sha256=config["sha256"])
    localizer = ShardLocalizer(model, config, WorkerSettings(batch_size=4, decode_threads=1), rows)
    out = str(tmp_path / "d.parquet")
    result = localizer.localize(ShardJob(shard, out))
    localizer.close()
    assert (result.rows, result.errors) == (6, 0)
    table = pq.read_table(out)
    assert loc_map_shape(table.schema) == (16, 16)
    maps = table["loc_map"].to_pylist()
    assert len(maps) == 6 and all(len(m) == 256 for m in maps)
    # The stored maps are the model's patch-position maps (quantised), not cls/register positions.
    assert max(max(m) for m in maps) > min(min(m) for m in maps)
