"""Fast in-memory SAT/CAM experiments on the synthetic set (the lab behind bench_quality.py).

Loads the shards into memory once, trains with ``pipeline.train.loop`` (the same step the
Ray Train job runs), picks the threshold on val and reports test figures plus diagnostics
(map inside vs outside the object, PxAP). Used to search recipes quickly; the shipped
comparison goes through the jobs (bench_quality.py).

    python bench/quality_lab.py --data runs/data --method sat --epochs 16 --seed 0 --tag x
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.boxes import boxes_from_normalized, normalized_upsampled_maps  # noqa: E402
from model.losses import SATLossConfig  # noqa: E402
from pipeline.data.reader import read_samples  # noqa: E402
from pipeline.data.shards import expand_shards  # noqa: E402
from pipeline.train.loop import TrainConfig, build_model, build_optimizer, predict, train_epoch  # noqa: E402

TAUS = np.round(np.arange(0, 1.0001, 0.01), 2)


def load_split(spec: str, size: int):
    images, labels, boxes, masks = [], [], [], []
    for url in expand_shards(spec):
        for s in read_samples(url):
            if s.error:
                continue
            img = s.image if s.image.size == (size, size) else s.image.resize((size, size))
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            labels.append(s.label)
            sx, sy = size / s.width, size / s.height
            boxes.append(np.array([[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in s.gt_boxes], np.float32))
            m = s.mask if s.mask is not None else np.zeros((s.height, s.width), np.uint8)
            if m.shape != (size, size):
                m = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(m).resize((size, size)))
            masks.append(m > 127)
    return torch.stack(images), torch.tensor(labels), boxes, np.stack(masks)


def augmented_batches(images, labels, batch_size, gen: torch.Generator, size: int):
    """DESIGN §5's augmentation: resize to size*256/224, random crop, horizontal flip."""
    big = round(size * 256 / 224)
    resized = F.interpolate(images.float(), size=(big, big), mode="bilinear", align_corners=False)
    order = torch.randperm(len(images), generator=gen)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        ox = torch.randint(0, big - size + 1, (len(idx),), generator=gen)
        oy = torch.randint(0, big - size + 1, (len(idx),), generator=gen)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        crops = torch.stack([resized[i, :, y:y + size, x:x + size] for i, x, y in zip(idx.tolist(), ox.tolist(), oy.tolist())])
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        yield crops.round().clamp(0, 255).to(torch.uint8), labels[idx]


def iou(box, gts):
    ix0 = np.maximum(box[0], gts[:, 0]); iy0 = np.maximum(box[1], gts[:, 1])
    ix1 = np.minimum(box[2], gts[:, 2]); iy1 = np.minimum(box[3], gts[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    return inter / np.maximum(a + b - inter, 1e-9)


def sweep(norm_maps, gt_boxes):
    """Per tau: largest-box IoU (GT-known) and best-any-box IoU, per image."""
    n = len(norm_maps)
    largest = np.zeros((len(TAUS), n)); best = np.zeros((len(TAUS), n))
    for t, tau in enumerate(TAUS):
        per_image = boxes_from_normalized(norm_maps, float(tau), mode="all")
        for i, bx in enumerate(per_image):
            b = bx.numpy()
            ious = np.array([iou(row, gt_boxes[i]).max() for row in b])
            largest[t, i] = ious[0]
            best[t, i] = ious.max()
    return largest, best


def evaluate(model, cfg, images, labels, boxes, masks, tau_from=None):
    logits, maps = [], []
    for lg, mp in predict(model, images.split(256), cfg):
        logits.append(lg); maps.append(mp)
    logits, maps = torch.cat(logits), torch.cat(maps)
    size = images.shape[-1]
    norm = normalized_upsampled_maps(maps, [(size, size)] * len(images))
    return evaluate_maps(norm, logits, labels, boxes, masks, tau_from, float(maps.mean()))


def map_statistics(model, cfg, images, masks) -> dict:
    """The patch-grid map's spread and where it is high, e.g. before training: from scratch
    it starts flat; from a pre-trained backbone the random spatial query already draws a
    pattern, which the normalization term then sharpens wherever it lies."""
    maps = torch.cat([mp for _, mp in predict(model, images.split(256), cfg)])[:, 0]
    cell = images.shape[-1] // maps.shape[-1]
    on_object = F.avg_pool2d(torch.from_numpy(masks).float()[:, None], cell)[:, 0] > 0.5
    inside = np.array([float(m[o].mean()) if o.any() else np.nan for m, o in zip(maps, on_object)])
    outside = np.array([float(m[~o].mean()) if (~o).any() else np.nan for m, o in zip(maps, on_object)])
    flat = maps.flatten(1)
    return {
        "mean": round(float(flat.mean()), 3),
        "per_image_std": round(float(flat.std(1).mean()), 3),
        "higher_inside_object": round(float(np.nanmean(inside > outside)) * 100, 1),
    }


# --- trivial baselines: what the data gives away without learning anything ---------------


def center_maps(images: torch.Tensor) -> list[np.ndarray]:
    """A map peaked at the image centre (a pyramid): each tau cuts a centred square box."""
    size = images.shape[-1]
    r = np.abs(np.arange(size) - (size - 1) / 2) / (size / 2)
    pyramid = 1.0 - np.maximum(r[:, None], r[None, :])
    return [pyramid.astype(np.float32)] * len(images)


def contrast_maps(images: torch.Tensor, border: int = 4) -> list[np.ndarray]:
    """Colour distance of each pixel from the mean colour of the image's border, smoothed.

    A no-learning saliency map: it finds whatever differs from the surroundings.
    """
    x = images.float()
    edge = torch.cat([x[..., :border, :].flatten(2), x[..., -border:, :].flatten(2),
                      x[..., :, :border].flatten(2), x[..., :, -border:].flatten(2)], dim=2)
    dist = (x - edge.mean(2)[..., None, None]).norm(dim=1, keepdim=True)
    dist = F.avg_pool2d(dist, 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    lo = dist.flatten(1).min(1).values[:, None, None]
    hi = dist.flatten(1).max(1).values[:, None, None]
    return list(((dist - lo) / (hi - lo).clamp_min(1e-6)).numpy())


BASELINES = {"center": center_maps, "contrast": contrast_maps}


def evaluate_maps(norm, logits, labels, boxes, masks, tau_from=None, map_mean=float("nan")):
    largest, best = sweep(norm, boxes)
    gt_known_curve = (largest >= 0.5).mean(1) * 100
    tau_idx = int(np.argmax(gt_known_curve)) if tau_from is None else int(np.argmin(np.abs(TAUS - tau_from)))
    correct = (logits.argmax(1) == labels).numpy() if logits is not None else np.zeros(len(norm), bool)
    v2 = [float((best >= d).mean(1).max() * 100) for d in (0.3, 0.5, 0.7)]
    stack = np.stack(norm)
    inside = np.array([stack[i][masks[i]].mean() if masks[i].any() else np.nan for i in range(len(stack))])
    outside = np.array([stack[i][~masks[i]].mean() for i in range(len(stack))])
    return {
        "top1": float(correct.mean() * 100),
        "tau": float(TAUS[tau_idx]),
        "gt_known_loc": float(gt_known_curve[tau_idx]),
        "top1_loc": float(((largest[tau_idx] >= 0.5) & correct).mean() * 100),
        "maxboxacc": v2[1],
        "maxboxacc_v2": float(np.mean(v2)),
        "pxap": pxap(stack, masks),
        "inside_gt_outside": float(np.nanmean(inside > outside) * 100),
        "map_mean": map_mean,
    }


def pxap(scores, masks, bins=256):
    s = (scores.ravel() * (bins - 1)).round().astype(int)
    m = masks.ravel()
    pos = np.bincount(s[m], minlength=bins)[::-1].cumsum()
    allc = np.bincount(s, minlength=bins)[::-1].cumsum()
    prec = pos / np.maximum(allc, 1)
    rec = pos / max(m.sum(), 1)
    return float(np.sum(np.diff(np.concatenate([[0], rec])) * prec) * 100)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--method", default="sat", help="sat, cam, or a no-learning baseline: center, contrast")
    p.add_argument("--model", default=None)
    p.add_argument("--model-kwargs", default="{}")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--area-mode", default="batch")
    p.add_argument("--norm-weight", type=float, default=1.0)
    p.add_argument("--area-weight", type=float, default=1.0)
    p.add_argument("--spatial-start", type=float, default=0.0)
    p.add_argument("--spatial-ramp", type=float, default=0.0)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--backbone-lr-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="save the trained model's state dict (safetensors checkpoint)")
    p.add_argument("--select", default=None, choices=[None, "maxboxacc_v2", "gt_known_loc", "top1"],
                   help="evaluate val after every epoch and report test for the epoch best by this val figure")
    p.add_argument("--tag", default="")
    p.add_argument("--log", default="runs/lab_results.jsonl")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("LAB_THREADS", "2")))
    model_name = a.model or f"{a.method}_vit_micro_patch8_64"
    t0 = time.time()
    train = load_split(os.path.join(a.data, "train") + "/", a.img_size)
    val = load_split(os.path.join(a.data, "val") + "/", a.img_size)
    test = load_split(os.path.join(a.data, "test") + "/", a.img_size)
    num_classes = int(train[1].max()) + 1
    if a.method in BASELINES:
        v = evaluate_maps(BASELINES[a.method](val[0]), None, *val[1:])
        t = evaluate_maps(BASELINES[a.method](test[0]), None, *test[1:], tau_from=v["tau"])
        row = {"tag": a.tag or a.method, "method": a.method, "seed": a.seed, "args": vars(a), "train_s": 0,
               "val": v, "test": t}
        print(json.dumps(row), flush=True)
        with open(a.log, "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    cfg = TrainConfig(
        model=model_name, num_classes=num_classes, model_kwargs=json.loads(a.model_kwargs), epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr,
        loss=SATLossConfig(alpha=a.alpha, area_mode=a.area_mode, norm_weight=a.norm_weight, area_weight=a.area_weight),
        spatial_loss_start=a.spatial_start, spatial_loss_ramp=a.spatial_ramp,
        pretrained=a.pretrained, backbone_lr_scale=a.backbone_lr_scale, seed=a.seed,
    )
    model = build_model(cfg)
    init_map = map_statistics(model, cfg, val[0], val[3]) if a.method == "sat" else None
    if init_map:
        print(f"map before training (val): {init_map}", flush=True)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(a.seed)
    steps = len(train[0]) // a.batch_size
    print(f"data loaded in {time.time() - t0:.1f}s: train {len(train[0])} val {len(val[0])} test {len(test[0])}", flush=True)
    t_train = time.time()
    best, curve = None, []
    for epoch in range(a.epochs):
        m = train_epoch(model, augmented_batches(train[0], train[1], a.batch_size, gen, a.img_size), opt, cfg, epoch, steps)
        print(f"epoch {epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in m.items()), flush=True)
        if a.select:
            v = evaluate(model, cfg, *val)
            curve.append({k: round(v[k], 1) for k in ("top1", "gt_known_loc", "maxboxacc_v2", "pxap")})
            print(f"  val: {curve[-1]}", flush=True)
            if best is None or v[a.select] > best[0]:
                best = (v[a.select], epoch, {k: t.clone() for k, t in model.state_dict().items()})
    train_s = time.time() - t_train
    last = None
    if best is not None:  # the last epoch's figures too, to compare with the selected epoch's
        v_last = evaluate(model, cfg, *val)
        last = {"val": v_last, "test": evaluate(model, cfg, *test, tau_from=v_last["tau"])}
        model.load_state_dict(best[2])
    v = evaluate(model, cfg, *val)
    t = evaluate(model, cfg, *test, tau_from=v["tau"])
    row = {"tag": a.tag, "method": a.method, "seed": a.seed, "args": vars(a), "train_s": round(train_s), "val": v, "test": t}
    if init_map:
        row["init_map"] = init_map
    if best is not None:
        row.update(selected_epoch=best[1], val_curve=curve, last_epoch=last)
    print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(a.log) or ".", exist_ok=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(row) + "\n")
    if a.save:
        from model.checkpoint import checkpoint_bytes, default_config
        data = checkpoint_bytes(model, default_config(model_name, num_classes, model_kwargs=cfg.model_kwargs))
        with open(a.save, "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
