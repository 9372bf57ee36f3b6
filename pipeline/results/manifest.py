"""The run manifest, ``<output>/<run_id>/_manifest.json``: one contract, one writer, one reader.

``jobs/localize_shards.py`` writes it when a run ends (``write_manifest``); evaluate,
export and overlays read it (``read_manifest``). Both go through ``Manifest``, so what
is read is exactly what is written:

- provenance: ``run_id``, ``spec``, ``output``, ``checkpoint``, ``model_sha256`` and the
  checkpoint's ``model_config`` (its ``class_names`` name the classes);
- ``input_frame``: what the maps cover, ``{"kind": "resize", "size": S}`` or
  ``{"kind": "resize_crop", "resize": R, "crop": C, "offset": O}``;
- ``settings``: the row settings (``threshold``, ``topk``, ``box_mode`` ...), the
  resolved and requested ``precision``, ``batch_size``, ``max_retries``, ``limit``;
- ``shards``: one ``ShardEntry`` per shard of the spec (``done``, ``failed``, ``not run``);
- ``history``: one timing record per invocation of the run id (``timings`` is the last).

Manifests written before ``manifest_version`` existed read the same way (their
``input_frame`` may be missing: then the Parquet metadata says the frame). A document in
another shape (plain-string shard entries, a top-level ``config``/``threshold``) raises
``ManifestError`` saying what to do.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.data.storage import exists, join_url, read_bytes, write_bytes_atomic

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
SHARD_STATUSES = ("done", "failed", "not run")


class ManifestError(ValueError):
    """A manifest that is not JSON or not in the shape ``write_manifest`` writes."""


@dataclass
class ShardEntry:
    """One shard of the run; counts only once it is ``done``."""

    shard: str
    output: str
    status: str = "not run"
    rows: int | None = None
    errors: int | None = None
    seconds: float | None = None
    bytes: int | None = None
    run_started: str | None = None  # the invocation that wrote the file
    errors_by_attempt: list[str] | None = None  # failed shards: why, per attempt
    attempts: int = 0
    # Rows whose ground-truth label is outside the checkpoint's classes (kept, counted),
    # and the (min, max) of the shard's ground-truth labels.
    gt_labels_outside: int | None = None
    gt_label_range: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Manifest:
    run_id: str
    settings: dict[str, Any]
    shards: list[ShardEntry]
    spec: str = ""
    output: str = ""
    model_sha256: str = ""
    checkpoint: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    input_frame: dict[str, Any] | None = None  # None: not recorded (manifests from before --resize-crop)
    failed_shards: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    manifest_version: int = MANIFEST_VERSION

    @property
    def done(self) -> list[ShardEntry]:
        return [s for s in self.shards if s.status == "done"]

    @property
    def threshold(self) -> float | None:
        value = self.settings.get("threshold")
        return None if value is None else float(value)

    @property
    def class_names(self) -> list[str] | None:
        names = self.model_config.get("class_names")
        return [str(n) for n in names] if isinstance(names, list) else None

    @property
    def resize_crop(self) -> tuple[int, int] | None:
        """(resize, crop) when the run used ``--resize-crop``, else None."""
        frame = self.input_frame or {}
        if frame.get("kind") == "resize_crop":
            return int(frame["resize"]), int(frame["crop"])
        setting = self.settings.get("resize_crop")
        if isinstance(setting, dict):
            return int(setting["resize"]), int(setting["crop"])
        return None

    def to_json(self) -> dict[str, Any]:
        done = self.done
        return {
            "manifest_version": self.manifest_version,
            "run_id": self.run_id,
            "spec": self.spec,
            "output": self.output,
            "model_sha256": self.model_sha256,
            "checkpoint": self.checkpoint,
            "model_config": self.model_config,
            "input_frame": self.input_frame,
            "settings": self.settings,
            "shards_total": len(self.shards),
            "shards_done": len(done),
            "rows": sum(s.rows or 0 for s in done),
            "error_rows": sum(s.errors or 0 for s in done),
            "gt_labels_outside_classes": sum(s.gt_labels_outside or 0 for s in done),
            "failed_shards": self.failed_shards,
            "shards": [s.to_json() for s in self.shards],
            "timings": self.history[-1] if self.history else None,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, doc: Any, source: str) -> Manifest:
        """The manifest in ``doc``; ManifestError naming ``source`` when it is another shape."""
        redo = (
            "rerun jobs/localize_shards.py with the same --run-id to rewrite it (done shards are skipped), "
            f"or delete {source} to evaluate the Parquet files alone"
        )
        if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str):
            raise ManifestError(f"{source} is not a satloc run manifest (no run_id): {redo}")
        if doc.get("manifest_version", MANIFEST_VERSION) > MANIFEST_VERSION:
            raise ManifestError(
                f"{source} has manifest_version {doc['manifest_version']}, newer than this satloc reads "
                f"({MANIFEST_VERSION}): upgrade satloc"
            )
        shards = doc.get("shards")
        if not isinstance(doc.get("settings"), dict) or "config" in doc or "threshold" in doc or not (
            isinstance(shards, list) and all(isinstance(s, dict) and "shard" in s for s in shards)
        ):
            raise ManifestError(
                f"{source} is in an old shape (plain-string shard entries or a top-level config/threshold, "
                f"never written by jobs/localize_shards.py): {redo}"
            )
        known = {f.name for f in fields(ShardEntry)}
        entries = [ShardEntry(**{k: v for k, v in s.items() if k in known}) for s in shards]
        keep = {f.name for f in fields(cls)} - {"shards"}
        return cls(shards=entries, **{k: v for k, v in doc.items() if k in keep})


def manifest_url(run_url: str) -> str:
    return join_url(run_url, MANIFEST_NAME)


def write_manifest(run_url: str, manifest: Manifest) -> str:
    """Write the manifest into the run directory (atomically); its URL."""
    url = manifest_url(run_url)
    write_bytes_atomic(url, json.dumps(manifest.to_json(), indent=1).encode())
    return url


def read_manifest(run_url: str) -> Manifest | None:
    """The run's manifest; None when it has none (unfinished or running); ManifestError if unreadable."""
    url = manifest_url(run_url)
    if not exists(url):
        return None
    try:
        doc = json.loads(read_bytes(url))
    except ValueError as e:
        raise ManifestError(f"{url} is not valid JSON: {e}") from None
    return Manifest.from_json(doc, url)
