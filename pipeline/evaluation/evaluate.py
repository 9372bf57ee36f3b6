"""Evaluate one localize run (DESIGN §6): its Parquet directory -> a metrics dict.

``read_run`` loads ``<output>/<run_id>/*.parquet`` (checking that every file belongs to
one run) and the manifest (``pipeline.results.manifest``, exactly what localize wrote);
``evaluate_run`` joins ground truth (from the rows, or from ``--gt-shards``), sweeps the
thresholds (``pipeline.evaluation.metrics``) and returns the JSON the job writes. Metric values are
percentages; a metric that cannot be computed (no GT boxes, no labels, no masks) is None,
with a note saying why.

Thresholds transfer between runs: the JSON records ``chosen_threshold`` (the tau that
maximises BoxAcc at IoU 0.5 for the largest component, i.e. GT-known Loc), and
``threshold_from=`` reads it from another run's JSON or evaluates another run directory
(a labelled validation split) to get it. Top-1/Top-5/GT-known Loc then use that fixed
threshold; MaxBoxAcc and MaxBoxAccV2 are threshold-free by definition.

``protocol="sat"`` instead reproduces the official SAT evaluator (``pipeline.evaluation.sat_protocol``):
the official box rule in the 224 x 224 centre crop of the 256 x 256 resize, GT boxes mapped
into the crop, IoU with the +1-pixel convention, one fixed threshold (0.4 CUB, 0.3
ImageNet). It needs a run localized with ``--resize-crop 256,224`` (the frame is read from
the Parquet metadata and the manifest); the default protocol refuses such a run, whose maps
cover only the crop.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from model.boxes import check_threshold
from pipeline.evaluation import metrics
from pipeline.data.preprocess import ResizeCrop
from pipeline.data.storage import check_bucket, join_url, read_parquet, url_to_fs
from pipeline.evaluation import sat_protocol
from pipeline.results.manifest import MANIFEST_NAME, Manifest, read_manifest
from pipeline.results.run_dir import is_run_dir, parquet_files, shard_stem
from pipeline.results.schema import RUN_ID_KEY, loc_map_shape, resize_crop_of

EVAL_COLUMNS = (
    "key", "shard", "status", "error", "width", "height", "label", "score", "topk_labels",
    "class_name", "loc_map", "boxes", "fg_ratio", "gt_label", "gt_boxes", "threshold",
)
MAX_LISTED_ERRORS = 20
PROTOCOLS = ("choe", "sat")  # Choe et al.'s sweep (the default) | the official SAT evaluator
_NOT_A_RUN = "point it at a run directory <output>/<run_id> written by jobs/localize_shards.py"


@dataclass
class Run:
    """One run's rows and what is known about the run."""

    url: str
    run_id: str | None
    grid: tuple[int, int]
    table: pa.Table
    manifest: Manifest | None
    notes: list[str] = field(default_factory=list)
    resize_crop: ResizeCrop | None = None  # the maps cover this centre crop (--resize-crop); None: whole image

    def class_names(self) -> dict[int, str]:
        """Class id -> name: the manifest's list if it has one, else names seen in rows."""
        listed = self.manifest.class_names if self.manifest else None
        names: dict[int, str] = dict(enumerate(listed or []))
        labels = self.table.column("label").to_pylist()
        for label, name in zip(labels, self.table.column("class_name").to_pylist()):
            if label is not None and name is not None:
                names.setdefault(int(label), name)
        return names


def read_run(predictions_url: str) -> Run:
    """Load a run directory; ValueError for mixed runs, grids or no Parquet at all; StorageError
    (naming the bucket, endpoint and the variables to set) when an S3 run cannot be reached."""
    check_bucket(predictions_url)
    if not is_run_dir(predictions_url):
        raise ValueError(f"--predictions {predictions_url}: not a directory; {_NOT_A_RUN}")
    files = parquet_files(predictions_url)
    if not files:
        raise ValueError(f"--predictions {predictions_url}: no .parquet files; {_NOT_A_RUN}")
    notes: list[str] = []
    manifest = read_manifest(predictions_url)
    if manifest is None:
        notes.append(
            f"no {MANIFEST_NAME} in {predictions_url}: the run may be unfinished or still running; "
            f"evaluated the {len(files)} Parquet files present"
        )
    tables, run_ids, grids, frames = [], {}, {}, {}
    for name in files:
        table = read_parquet(join_url(predictions_url, name), columns=list(EVAL_COLUMNS))
        meta = table.schema.metadata or {}
        run_ids.setdefault(meta.get(RUN_ID_KEY, b"").decode() or None, []).append(name)
        try:
            grids.setdefault(loc_map_shape(table.schema), []).append(name)
        except ValueError as e:
            raise ValueError(f"{name} in {predictions_url}: {e}") from None
        frames.setdefault(resize_crop_of(table.schema), []).append(name)
        tables.append(table.replace_schema_metadata(None))
    run_id = _one_run_id(predictions_url, run_ids, manifest)
    if len(grids) > 1:
        raise ValueError(
            f"--predictions {predictions_url}: files disagree on the loc_map grid "
            f"({', '.join(f'{h}x{w}' for h, w in grids)}); they come from different models"
        )
    if manifest is not None:
        notes += _manifest_notes(manifest, files)
    frame = _run_frame(predictions_url, frames, manifest)
    return Run(predictions_url, run_id, next(iter(grids)), pa.concat_tables(tables), manifest, notes, frame)


def _one_run_id(url: str, run_ids: dict[str | None, list[str]], manifest: Manifest | None) -> str | None:
    """The run id the files (and manifest) agree on; ValueError when the directory mixes runs."""
    named = {r: f for r, f in run_ids.items() if r is not None}
    if len(named) > 1:
        listing = "; ".join(f"run {r!r}: {', '.join(f[:3])}{' ...' if len(f) > 3 else ''}" for r, f in named.items())
        raise ValueError(
            f"--predictions {url} mixes files of {len(named)} runs ({listing}); "
            "each run writes its own <output>/<run_id> directory: point --predictions at one of them"
        )
    run_id = next(iter(named), None)
    if manifest is None:
        return run_id
    if run_id and manifest.run_id and manifest.run_id != run_id:
        raise ValueError(
            f"{join_url(url, MANIFEST_NAME)} is for run {manifest.run_id!r} but the Parquet "
            f"files are from run {run_id!r}: the directory mixes runs"
        )
    return run_id or manifest.run_id


def _run_frame(url: str, frames: dict, manifest: Manifest | None) -> ResizeCrop | None:
    """The one input frame of a run's files (and manifest); ValueError when they disagree."""
    def show(f: tuple[int, int] | None) -> str:
        return "whole image (no --resize-crop)" if f is None else f"--resize-crop {f[0]},{f[1]}"

    if len(frames) > 1:
        listing = "; ".join(f"{show(f)}: {', '.join(n[:3])}" for f, n in frames.items())
        raise ValueError(f"--predictions {url}: files were localized in different input frames ({listing})")
    frame = next(iter(frames))
    if manifest is not None:
        recorded = manifest.resize_crop
        if recorded != frame and (recorded is not None or manifest.input_frame is not None):
            raise ValueError(
                f"{join_url(url, MANIFEST_NAME)} records {show(recorded)} but the Parquet files {show(frame)}: "
                "the directory mixes runs"
            )
    return ResizeCrop(*frame) if frame else None


def loc_maps_of(ok: pa.Table, grid: tuple[int, int]) -> np.ndarray:
    """(n, h, w) uint8 maps of good rows; ValueError naming a good row without a map."""
    column = ok.column("loc_map")
    if column.null_count:
        missing = [k for k, m in zip(ok.column("key").to_pylist(), column.is_null().to_pylist()) if m]
        raise ValueError(f"{len(missing)} rows with status 'ok' have no loc_map (first key: {missing[0]!r})")
    if ok.num_rows == 0:
        return np.zeros((0, *grid), dtype=np.uint8)
    flat = np.asarray(column.combine_chunks().flatten(), dtype=np.uint8)
    return flat.reshape(ok.num_rows, *grid)


def _manifest_notes(manifest: Manifest, files: list[str]) -> list[str]:
    """Shards the manifest lists that are not done or have no Parquet file here."""
    present = {shard_stem(p) for p in files}
    missing, not_done = [], []
    for entry in manifest.shards:
        if entry.status != "done":
            not_done.append(f"{entry.shard} ({entry.status})")
        elif shard_stem(entry.output or entry.shard) not in present:
            missing.append(shard_stem(entry.output or entry.shard))
    notes = []
    if not_done:
        notes.append(f"{len(not_done)} shards of the run are not done (first: {not_done[0]}): their rows are missing")
    if missing:
        notes.append(f"{len(missing)} shards listed in the manifest have no Parquet file (first: {missing[0]})")
    return notes


def _run_threshold(run: Run) -> tuple[float, str]:
    recorded = run.manifest.threshold if run.manifest else None
    if recorded is not None:
        return recorded, "manifest"
    values = {round(float(v), 6) for v in run.table.column("threshold").to_pylist() if v is not None}
    if len(values) == 1:
        return values.pop(), "rows"
    if not values:
        raise ValueError(f"run {run.url} records no threshold: pass --threshold")
    raise ValueError(f"run {run.url} rows use {len(values)} thresholds ({sorted(values)}): pass --threshold")


def threshold_from(url: str) -> float:
    """The threshold chosen on another run: from its evaluation JSON or its run directory."""
    fs, path = url_to_fs(url)
    if fs.isfile(path):
        with fs.open(path, "rb") as f:
            try:
                result = json.load(f)
            except ValueError as e:
                raise ValueError(f"--threshold-from {url}: not an evaluation JSON ({e})") from None
    elif fs.isdir(path):
        result = evaluate_run(url)
    else:
        raise ValueError(f"--threshold-from {url}: no such file or run directory")
    chosen = result.get("chosen_threshold") if isinstance(result, dict) else None
    if chosen is None:
        raise ValueError(
            f"--threshold-from {url}: it chose no threshold (it has no GT boxes); evaluate a labelled "
            "validation run, with --gt-shards if its rows lack boxes, and pass that JSON"
        )
    return float(chosen)


def _resolve_threshold(run: Run, threshold: float | None, threshold_from_url: str | None) -> tuple[float, str]:
    if threshold is not None and threshold_from_url is not None:
        raise ValueError("give either --threshold or --threshold-from, not both")
    if threshold is not None:
        value, source = float(threshold), "given"
    elif threshold_from_url is not None:
        value, source = threshold_from(threshold_from_url), f"chosen on {threshold_from_url}"
    else:
        value, source = _run_threshold(run)
    return check_threshold(value, "--threshold"), source


@dataclass
class _Truth:
    labels: list[int | None]
    boxes: list[list | None]
    masks: list[np.ndarray | None]  # np.packbits of the bool mask on the evaluation grid
    names: dict[int, str]


def _join_ground_truth(ok: pa.Table, gt_shards: str | None, notes: list[str]) -> _Truth:
    labels = ok.column("gt_label").to_pylist()
    boxes = ok.column("gt_boxes").to_pylist()
    masks: list[np.ndarray | None] = [None] * ok.num_rows
    names: dict[int, str] = {}
    if gt_shards is None:
        return _Truth(labels, boxes, masks, names)
    from pipeline.evaluation.ground_truth import read_ground_truth_by_shard

    keys = ok.column("key").to_pylist()
    stems = [shard_stem(s or "") for s in ok.column("shard").to_pylist()]
    truth = read_ground_truth_by_shard(gt_shards, keys, mask_size=metrics.EVAL_SIZE)
    stems_of_key: dict[str, list[str]] = {}
    for stem, key in truth:
        stems_of_key.setdefault(key, []).append(stem)
    widths, heights = ok.column("width").to_pylist(), ok.column("height").to_pylist()
    unmatched, bad_masks = 0, []
    for i, key in enumerate(keys):
        gt = truth.get((stems[i], key))
        if gt is None:
            if key in stems_of_key:  # the key, in a shard of another name: another data set or split
                raise ValueError(
                    f"--gt-shards {gt_shards}: the row of key {key!r} comes from shard {stems[i]} but the "
                    f"ground truth has that key only in {', '.join(sorted(stems_of_key[key])[:3])}; "
                    "ground truth joins on (shard, key): point --gt-shards at the shards this run localized"
                )
            unmatched += 1
            continue
        if labels[i] is None:
            labels[i] = gt.label
        if not boxes[i]:
            boxes[i] = gt.boxes
        if gt.label is not None and gt.class_name is not None:
            names.setdefault(int(gt.label), gt.class_name)
        if gt.mask is not None:
            if gt.mask_shape != (heights[i], widths[i]):
                bad_masks.append(key)
            else:
                masks[i] = np.packbits(gt.mask)  # 1 bit a pixel until PxAP needs it
    if unmatched:
        notes.append(f"{unmatched} of {len(keys)} predicted keys are not in --gt-shards {gt_shards}")
    if bad_masks:
        notes.append(f"{len(bad_masks)} masks differ in size from their image and were skipped (first: {bad_masks[0]})")
    return _Truth(labels, boxes, masks, names)


def _pct(hits: np.ndarray) -> float | None:
    return float(hits.mean() * 100.0) if len(hits) else None


# Outside int32, so no stored label can equal them (labels outside the checkpoint's
# classes, negative ones too, are scored as misses and listed per class).
NO_LABEL = np.iinfo(np.int64).min
NO_PREDICTION = NO_LABEL + 1


@dataclass
class _Scored:
    """A run's good rows against their ground truth: what both protocols start from."""

    ok: pa.Table
    errors: pa.Table
    truth: _Truth
    names: dict[int, str]
    gt_labels: np.ndarray  # NO_LABEL where the row has none (any int32, negative too, is a label)
    has_label: np.ndarray
    top1_hit: np.ndarray
    top5_hit: np.ndarray
    loc_idx: np.ndarray  # rows with at least one GT box
    notes: list[str]


def _score(run: Run, gt_shards: str | None) -> _Scored:
    """Split rows, join ground truth, classification hits; notes on what is missing."""
    notes = list(run.notes)
    status = np.array(run.table.column("status").to_pylist(), dtype=object)
    ok = run.table.filter(pa.array(status == "ok"))
    errors = run.table.filter(pa.array(status != "ok"))
    truth = _join_ground_truth(ok, gt_shards, notes)
    gt_labels = np.array([NO_LABEL if v is None else int(v) for v in truth.labels], dtype=np.int64)
    has_label = gt_labels != NO_LABEL
    pred = np.array([NO_PREDICTION if v is None else int(v) for v in ok.column("label").to_pylist()], dtype=np.int64)
    topk = ok.column("topk_labels").to_pylist()
    if ok.num_rows and not has_label.any():
        notes.append("no ground-truth labels (gt_label, .cls or .json label): top1/top5 and Top-k Loc are null")
    loc_idx = np.flatnonzero(np.array([bool(b) for b in truth.boxes], dtype=bool))
    if ok.num_rows and loc_idx.size == 0:
        notes.append(
            "no ground-truth boxes (gt_boxes in the rows, or .json boxes via --gt-shards): "
            "localisation metrics are null"
        )
    return _Scored(ok, errors, truth, {**truth.names, **run.class_names()}, gt_labels, has_label,
                   pred == gt_labels, metrics.topk_hits(gt_labels, topk, 5), loc_idx, notes)


def _common_result(
    run: Run, s: _Scored, protocol: str, threshold: float, source: str, gt_known: np.ndarray, **frame
) -> dict:
    """The keys both protocols fill the same way (sweep-only keys start null); ``frame``:
    ``eval_size`` (and ``input_frame``)."""
    loc_and_label = s.has_label[s.loc_idx]
    top_loc = loc_and_label.any()
    return {
        "protocol": protocol,
        "run_id": run.run_id,
        "predictions": run.url,
        "num_images": s.ok.num_rows,
        "num_errors": s.errors.num_rows,
        "num_cls_images": int(s.has_label.sum()),
        "num_loc_images": int(s.loc_idx.size),
        "threshold": threshold,
        "threshold_source": source,
        **frame,
        "top1": _pct(s.top1_hit[s.has_label]),
        "top5": _pct(s.top5_hit[s.has_label]),
        "gt_known_loc": _pct(gt_known),
        "top1_loc": _pct((gt_known & s.top1_hit[s.loc_idx])[loc_and_label]) if top_loc else None,
        "top5_loc": _pct((gt_known & s.top5_hit[s.loc_idx])[loc_and_label]) if top_loc else None,
        "maxboxacc": None,
        "maxboxacc_v2": None,
        "maxboxacc_v2_by_delta": None,
        "best_taus": None,
        "chosen_threshold": None,
        "pxap": None,
        "num_pxap_images": 0,
    }


def _finish(result: dict, s: _Scored) -> dict:
    """The listed error rows and the notes, last."""
    errors = s.errors
    result["errors"] = [
        {"key": k, "shard": sh, "error": e}
        for k, sh, e in zip(
            errors.column("key").to_pylist()[:MAX_LISTED_ERRORS],
            errors.column("shard").to_pylist()[:MAX_LISTED_ERRORS],
            errors.column("error").to_pylist()[:MAX_LISTED_ERRORS],
        )
    ]
    if errors.num_rows:
        s.notes.append(f"{errors.num_rows} error rows (status='error') were counted, not evaluated")
    result["notes"] = s.notes
    return result


def evaluate_run(
    predictions_url: str,
    threshold: float | None = None,
    threshold_from: str | None = None,
    gt_shards: str | None = None,
    workers: int | None = None,
    protocol: str = "choe",
) -> dict:
    """All DESIGN §6 metrics of one run, as the JSON-ready dict the job writes.

    ``protocol="sat"``: the official SAT evaluator's figures instead (``evaluate_sat``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    run = read_run(predictions_url)
    if protocol == "sat":
        return evaluate_sat(run, threshold, threshold_from, gt_shards)
    return evaluate_choe(run, threshold, threshold_from, gt_shards, workers)


def evaluate_choe(
    run: Run,
    threshold: float | None = None,
    threshold_from: str | None = None,
    gt_shards: str | None = None,
    workers: int | None = None,
) -> dict:
    """Choe et al.'s protocol: GT-known/Top-k Loc at one threshold, the sweep metrics, PxAP."""
    if run.resize_crop is not None:
        f = run.resize_crop
        raise ValueError(
            f"--predictions {run.url} was localized with --resize-crop {f.resize},{f.crop}: its maps "
            "cover the centre crop only, not the whole image the default (Choe et al.) protocol evaluates; "
            "evaluate it with --protocol sat, or localize again without --resize-crop"
        )
    thr, thr_source = _resolve_threshold(run, threshold, threshold_from)
    s = _score(run, gt_shards)
    if any(t is not None and len(t) < 5 for t, h in zip(s.ok.column("topk_labels").to_pylist(), s.has_label) if h):
        s.notes.append("rows carry fewer than 5 top-k labels: top5 counts the labels present")
    loc_maps = loc_maps_of(s.ok, run.grid)
    taus = np.union1d(metrics.TAUS, [thr])
    grid_k = np.array([metrics.tau_index(taus, t) for t in metrics.TAUS])
    sweep = _box_sweep(s, loc_maps, taus, workers)
    gt_known = sweep.largest_iou[:, metrics.tau_index(taus, thr)] >= 0.5
    grid_sweep = metrics.BoxSweep(metrics.TAUS, sweep.largest_iou[:, grid_k], sweep.best_iou[:, grid_k])

    result = _common_result(run, s, "choe", thr, thr_source, gt_known, eval_size=list(metrics.EVAL_SIZE))
    if s.loc_idx.size:
        value, tau = metrics.max_box_acc(grid_sweep)
        v2, by_delta = metrics.max_box_acc_v2(grid_sweep)
        result["maxboxacc"] = value
        result["maxboxacc_v2"] = v2
        result["maxboxacc_v2_by_delta"] = {f"{d:.1f}": v for d, (v, _) in by_delta.items()}
        result["best_taus"] = {"maxboxacc": tau, **{f"{d:.1f}": t for d, (_, t) in by_delta.items()}}
        result["chosen_threshold"] = tau
    _add_pxap(result, s, loc_maps)
    result["per_class"] = _per_class(
        s.gt_labels, s.has_label, s.top1_hit, s.top5_hit, s.loc_idx, gt_known, grid_sweep, result["best_taus"], s.names
    )
    return _finish(result, s)


def _box_sweep(s: _Scored, loc_maps: np.ndarray, taus: np.ndarray, workers: int | None) -> metrics.BoxSweep:
    """IoUs of the boxed images at every tau (in parallel for large runs)."""
    widths = np.array(s.ok.column("width").to_pylist(), dtype=np.float64)
    heights = np.array(s.ok.column("height").to_pylist(), dtype=np.float64)
    idx = s.loc_idx
    # per image, padded per chunk: one image with many boxes must not pad every image to its count
    gt_eval = metrics.wsol_gt_box_list([s.truth.boxes[i] for i in idx], widths[idx], heights[idx])
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    return metrics.sweep_loc_maps(loc_maps[idx], gt_eval, taus, workers=workers if idx.size > 512 else 1)


def _add_pxap(result: dict, s: _Scored, loc_maps: np.ndarray) -> None:
    """PxAP over the images with a foreground mask, in chunks of 64."""
    mask_idx = [i for i, m in enumerate(s.truth.masks) if m is not None]
    if not mask_idx:
        if s.ok.num_rows:
            s.notes.append("no foreground masks (.mask.png via --gt-shards): pxap is null")
        return
    acc = metrics.PxapAccumulator()
    size = metrics.EVAL_SIZE[0] * metrics.EVAL_SIZE[1]
    for start in range(0, len(mask_idx), 64):
        part = mask_idx[start : start + 64]
        scores = metrics.wsol_score_maps(loc_maps[part])
        masks = [np.unpackbits(s.truth.masks[i], count=size).astype(bool) for i in part]
        acc.add(scores, np.stack(masks).reshape(scores.shape))
    result["pxap"] = acc.value()
    result["num_pxap_images"] = len(mask_idx)


def evaluate_sat(
    run: Run, threshold: float | None = None, threshold_from: str | None = None, gt_shards: str | None = None
) -> dict:
    """The official SAT evaluator's figures of a run localized with ``--resize-crop``.

    Same JSON keys as the default protocol; the sweep metrics (MaxBoxAcc, PxAP) are null.
    """
    frame = run.resize_crop
    if frame is None:
        raise ValueError(
            f"--protocol sat needs the official test frame, but {run.url} was localized on the whole image: "
            "rerun jobs/localize_shards.py with --resize-crop 256,224 (and a new --output or --run-id), "
            "then evaluate that run"
        )
    if threshold_from is not None:
        raise ValueError(
            "--protocol sat uses one fixed threshold: pass --threshold (default 0.4 as on CUB; "
            "0.3 for ImageNet), not --threshold-from"
        )
    thr = check_threshold(sat_protocol.CUB_THRESHOLD if threshold is None else threshold, "--threshold")
    s = _score(run, gt_shards)
    if frame != sat_protocol.OFFICIAL_FRAME:
        note = f"the run's frame is --resize-crop {frame.resize},{frame.crop}, not the official 256,224"
        s.notes.insert(len(run.notes), note)
    widths = s.ok.column("width").to_pylist()
    heights = s.ok.column("height").to_pylist()
    idx = s.loc_idx
    _, ious = sat_protocol.best_ious(
        loc_maps_of(s.ok, run.grid)[idx],
        [s.truth.boxes[i] for i in idx],
        [widths[i] for i in idx],
        [heights[i] for i in idx],
        thr,
        frame,
    )
    gt_known = ious >= sat_protocol.GT_KNOWN_IOU
    s.notes.append(
        "SAT protocol: boxes from the stored 8-bit loc_map (the official code thresholds the float map; "
        "a pixel within about 1/510 of the map's range from the threshold can differ), classification "
        "from the centre crop (the paper's CUB figures classify by ten-crop)"
    )
    source = "given" if threshold is not None else "SAT protocol default (CUB)"
    result = _common_result(run, s, "sat", thr, source, gt_known, eval_size=[frame.crop, frame.crop],
                            input_frame={"resize": frame.resize, "crop": frame.crop})
    result["per_class"] = _per_class(
        s.gt_labels, s.has_label, s.top1_hit, s.top5_hit, idx, gt_known, None, None, s.names
    )
    return _finish(result, s)


def _per_class(
    gt_labels: np.ndarray,
    has_label: np.ndarray,
    top1_hit: np.ndarray,
    top5_hit: np.ndarray,
    loc_idx: np.ndarray,
    gt_known: np.ndarray,
    sweep: metrics.BoxSweep | None,  # None with best_taus None (no sweep: the SAT protocol)
    best_taus: dict | None,
    names: dict[int, str],
) -> dict:
    """Per true class: counts and accuracies; BoxAcc at the run-wide best tau."""
    out: dict = {}
    in_loc = np.full(len(gt_labels), -1)
    in_loc[loc_idx] = np.arange(len(loc_idx))
    boxacc_k = metrics.tau_index(sweep.taus, best_taus["maxboxacc"]) if best_taus else None
    for label in sorted(set(gt_labels[has_label].tolist())):
        rows = np.flatnonzero(gt_labels == label)
        loc_rows = in_loc[rows][in_loc[rows] >= 0]
        entry = {
            "label": int(label),
            "num_images": int(len(rows)),
            "top1": _pct(top1_hit[rows]),
            "top5": _pct(top5_hit[rows]),
            "gt_known_loc": _pct(gt_known[loc_rows]),
            "top1_loc": _pct((gt_known[loc_rows] & top1_hit[loc_idx][loc_rows])) if loc_rows.size else None,
            "top5_loc": _pct((gt_known[loc_rows] & top5_hit[loc_idx][loc_rows])) if loc_rows.size else None,
            "boxacc_at_best_tau": _pct(sweep.largest_iou[loc_rows, boxacc_k] >= metrics.MAXBOXACC_DELTA)
            if boxacc_k is not None and loc_rows.size
            else None,
        }
        out[names.get(int(label), str(label))] = entry
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:6.2f}"


def format_table(result: dict) -> str:
    """The result as a readable text table (the JSON has everything)."""
    lines = [
        f"run {result['run_id'] or '?'}: {result['num_images']} images evaluated, "
        f"{result['num_errors']} error rows; threshold {result['threshold']:.3f} ({result['threshold_source']})",
    ]
    sat = result.get("protocol") == "sat"
    if sat:
        frame = result["input_frame"]
        lines.append(
            f"protocol: the official SAT evaluator (centre crop {frame['crop']} of a {frame['resize']} resize, "
            "IoU +1, fixed threshold)"
        )
    lines += ["", f"{'metric':<24}{'value (%)':>10}"]
    rows = [
        ("Top-1 cls", result["top1"]),
        ("Top-5 cls", result["top5"]),
        ("GT-known Loc", result["gt_known_loc"]),
        ("Top-1 Loc", result["top1_loc"]),
        ("Top-5 Loc", result["top5_loc"]),
    ]
    if not sat:  # sweep metrics: not part of the SAT protocol
        rows += [("MaxBoxAcc (IoU 0.5)", result["maxboxacc"]), ("MaxBoxAccV2", result["maxboxacc_v2"])]
        for delta, value in (result["maxboxacc_v2_by_delta"] or {}).items():
            rows.append((f"  v2 part, IoU {delta}", value))
        rows.append(("PxAP", result["pxap"]))
    lines += [f"{name:<24}{_fmt(value):>10}" for name, value in rows]
    if result["best_taus"]:
        taus = result["best_taus"]
        parts = ", ".join(f"IoU {k} at {v:.2f}" for k, v in taus.items() if k != "maxboxacc")
        lines.append(f"best taus: MaxBoxAcc at {taus['maxboxacc']:.2f}; v2: {parts}")
    if result["per_class"]:
        lines += ["", f"{'class':<20}{'n':>6}{'top1':>8}{'top5':>8}{'gt-known':>10}{'top1-loc':>10}{'boxacc':>8}"]
        for name, c in result["per_class"].items():
            lines.append(
                f"{name[:19]:<20}{c['num_images']:>6}{_fmt(c['top1']):>8}{_fmt(c['top5']):>8}"
                f"{_fmt(c['gt_known_loc']):>10}{_fmt(c['top1_loc']):>10}{_fmt(c['boxacc_at_best_tau']):>8}"
            )
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
