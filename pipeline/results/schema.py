"""The Parquet contract of a localization run (DESIGN §3), in explicit pyarrow types.

One row per input sample, bad samples included. DuckDB and pyarrow read these files
plainly: no extension types, the map's grid shape lives in the file's key-value metadata.
"""
from __future__ import annotations

import pyarrow as pa

LOC_MAP_SHAPE_KEY = b"satloc.loc_map_shape"
RUN_ID_KEY = b"satloc.run_id"
# "RESIZE,CROP" when the run used the official SAT test frame (--resize-crop); absent otherwise.
RESIZE_CROP_KEY = b"satloc.resize_crop"

BOX_TYPE = pa.struct(
    [
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("score", pa.float32()),
    ]
)


def localize_schema(
    grid_h: int, grid_w: int, run_id: str = "", resize_crop: tuple[int, int] | None = None
) -> pa.Schema:
    """Schema of one shard's output file for maps on a ``grid_h x grid_w`` patch grid.

    ``resize_crop`` (resize, crop) records that the maps cover the centre crop of that frame.
    """
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"loc_map grid must be positive, got {grid_h}x{grid_w}")
    fields = [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.int32()),
        ("score", pa.float32()),
        ("topk_labels", pa.list_(pa.int32())),
        ("topk_scores", pa.list_(pa.float32())),
        ("class_name", pa.string()),
        ("loc_map", pa.list_(pa.uint8(), grid_h * grid_w)),
        ("boxes", pa.list_(BOX_TYPE)),
        ("box_x0", pa.float32()),
        ("box_y0", pa.float32()),
        ("box_x1", pa.float32()),
        ("box_y1", pa.float32()),
        ("fg_ratio", pa.float32()),
        ("gt_label", pa.int32()),
        ("gt_boxes", pa.list_(pa.list_(pa.float32()))),
        ("model_sha256", pa.string()),
        ("threshold", pa.float32()),
    ]
    metadata = {LOC_MAP_SHAPE_KEY: f"{grid_h},{grid_w}".encode()}
    if run_id:
        metadata[RUN_ID_KEY] = run_id.encode()
    if resize_crop is not None:
        metadata[RESIZE_CROP_KEY] = f"{int(resize_crop[0])},{int(resize_crop[1])}".encode()
    return pa.schema([pa.field(n, t) for n, t in fields], metadata=metadata)


def loc_map_shape(schema: pa.Schema) -> tuple[int, int]:
    """The (h, w) grid of the ``loc_map`` column, read from the file's metadata."""
    meta = schema.metadata or {}
    if LOC_MAP_SHAPE_KEY not in meta:
        raise ValueError(
            "Parquet file has no 'satloc.loc_map_shape' metadata: it was not written by "
            "satloc's localize job (rerun jobs/localize_shards.py to produce it)"
        )
    h, w = (int(v) for v in meta[LOC_MAP_SHAPE_KEY].decode().split(","))
    return h, w


def resize_crop_of(schema: pa.Schema) -> tuple[int, int] | None:
    """The (resize, crop) frame a file's maps were made in, or None (the whole image)."""
    value = (schema.metadata or {}).get(RESIZE_CROP_KEY)
    if not value:
        return None
    resize, crop = (int(v) for v in value.decode().split(","))
    return resize, crop
