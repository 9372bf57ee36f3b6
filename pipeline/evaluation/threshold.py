"""Choosing the box threshold on a labelled validation split (DESIGN §5, §6).

The sweep itself is ``pipeline.evaluation.metrics.sweep_boxes``, every tau at once, under
the official SAT box rule that the localize job applies with the chosen threshold
(``model.boxes``): each map min-max normalised on its patch grid (with the 1e-5), upsampled
bilinearly to the model input size, foreground ``> tau``, the largest 8-connected
component's box; GT boxes are scaled to the input size. This module turns its per-image
IoUs into *counts summed over images*, so batches and Ray Train ranks add them up (one
all-reduce) before a threshold is chosen:

- ``gt_known[t]``: images whose largest component's box (the SAT rule's box at that
  threshold, in the input frame) has IoU >= 0.5 with the best-matching GT box (the SAT paper's GT-known
  Loc, given the true class);
- ``box_hits[d, t]``: images where *some* component's box reaches IoU >= delta_d with
  some GT box (Choe et al.'s BoxAcc with every component a box), delta in 0.3/0.5/0.7.

Images without a GT box are not counted. ``choose_threshold`` turns the counts into the
chosen tau and the headline figures. With ``maxboxacc_v2`` a single tau is chosen: the one
maximising the mean over deltas of BoxAcc(tau, delta); the reported MaxBoxAccV2 itself
lets each delta pick its own tau, as Choe et al. define it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.evaluation.metrics import IOU_DELTAS, gt_boxes_to_eval, score_maps, sweep_boxes

GT_KNOWN_IOU = 0.5
THRESHOLD_METRICS = ("gt_known", "maxboxacc_v2")


def tau_grid(step: float = 0.01) -> np.ndarray:
    """Thresholds 0, step, ..., 1 (the official grid is 0.01)."""
    if not 0 < step <= 0.5:
        raise ValueError(f"tau grid step must be in (0, 0.5], got {step}")
    return np.round(np.arange(0.0, 1.0 + step / 2, step), 6)


@dataclass
class LocCounts:
    """Per-threshold hit counts over a set of images; add them across batches and ranks."""

    taus: np.ndarray
    gt_known: np.ndarray  # [T]
    box_hits: np.ndarray  # [len(IOU_DELTAS), T]
    images: int

    @classmethod
    def zeros(cls, taus: np.ndarray) -> "LocCounts":
        return cls(taus, np.zeros(len(taus)), np.zeros((len(IOU_DELTAS), len(taus))), 0)

    def __add__(self, other: "LocCounts") -> "LocCounts":
        return LocCounts(self.taus, self.gt_known + other.gt_known, self.box_hits + other.box_hits,
                         self.images + other.images)

    def to_vector(self) -> np.ndarray:
        """Flat float64 vector (for one all-reduce); ``from_vector`` inverts it."""
        return np.concatenate([self.gt_known, self.box_hits.ravel(), [self.images]]).astype(np.float64)

    @classmethod
    def from_vector(cls, taus: np.ndarray, vector: np.ndarray) -> "LocCounts":
        t = len(taus)
        return cls(taus, vector[:t], vector[t: t + len(IOU_DELTAS) * t].reshape(len(IOU_DELTAS), t),
                   int(round(vector[-1])))


def count_hits(
    loc_maps: torch.Tensor, gt_boxes: Sequence[np.ndarray], input_size: int, taus: np.ndarray
) -> LocCounts:
    """Counts for one batch: maps B x 1 x h x w, GT boxes per image already in input pixels."""
    if len(gt_boxes) != loc_maps.shape[0]:
        raise ValueError(f"{loc_maps.shape[0]} maps but {len(gt_boxes)} GT box lists")
    keep = [i for i, g in enumerate(gt_boxes) if len(g)]
    counts = LocCounts.zeros(taus)
    if not keep:
        return counts
    size = (input_size, input_size)
    scores = score_maps(loc_maps[keep, 0].detach().float().cpu().numpy(), size)
    ones = np.full(len(keep), float(input_size))
    gt_eval = gt_boxes_to_eval([gt_boxes[i] for i in keep], ones, ones, size)
    sweep = sweep_boxes(scores, gt_eval, taus)
    counts.gt_known = (sweep.largest_iou >= GT_KNOWN_IOU).sum(axis=0).astype(np.float64)
    counts.box_hits = np.stack([(sweep.best_iou >= d).sum(axis=0) for d in IOU_DELTAS]).astype(np.float64)
    counts.images = len(keep)
    return counts


def choose_threshold(counts: LocCounts, metric: str = "gt_known") -> dict[str, float]:
    """The chosen tau and the figures (percent) on the counted set."""
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"threshold metric must be one of {THRESHOLD_METRICS}, got {metric!r}")
    if counts.images == 0:
        raise ValueError("no validation image with a GT box: cannot choose a threshold")
    gt_known = counts.gt_known / counts.images * 100
    box_acc = counts.box_hits / counts.images * 100  # [D, T]
    if metric == "gt_known":
        best = int(np.argmax(gt_known))
    else:
        best = int(np.argmax(box_acc.mean(axis=0)))
    return {
        "threshold": float(counts.taus[best]),
        "gt_known_loc": float(gt_known[best]),
        "max_gt_known_loc": float(gt_known.max()),
        "maxboxacc_v2": float(box_acc.max(axis=1).mean()),
        "maxboxacc": float(box_acc[IOU_DELTAS.index(0.5)].max()),
    }
