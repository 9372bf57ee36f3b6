"""A contact sheet of a lab model's maps on test images (to see what a figure means).

    python bench/lab_sheet.py --checkpoint runs/x.safetensors --data runs/data --tau 0.5 --out runs/x.png
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_lab import iou, load_split  # noqa: E402
from model.boxes import boxes_from_normalized, normalized_upsampled_maps  # noqa: E402
from pipeline.data.checkpoints import load_checkpoint  # noqa: E402
from pipeline.evaluation.overlays import Tile, render_sheet  # noqa: E402
from pipeline.train.loop import TrainConfig, predict  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    model, config = load_checkpoint(a.checkpoint)
    images, labels, boxes, _ = load_split(os.path.join(a.data, a.split) + "/", 64)
    images, labels, boxes = images[: a.num], labels[: a.num], boxes[: a.num]
    cfg = TrainConfig(model=config["model"], num_classes=config["num_classes"])
    (logits, maps), = list(predict(model, [images], cfg))
    norm = normalized_upsampled_maps(maps, [(64, 64)] * len(images))
    pred = boxes_from_normalized(norm, a.tau)
    tiles, pics = [], {}
    for i in range(len(images)):
        box = pred[i][0].tolist()
        key = f"{i:03d}"
        caption = f"y={int(labels[i])} p={int(logits[i].argmax())} IoU {iou(np.array(box), boxes[i]).max():.2f}"
        tiles.append(Tile(key, 64, 64, maps[i, 0].numpy(), [tuple(box[:4])], boxes[i].tolist(), caption))
        pics[key] = Image.fromarray(images[i].permute(1, 2, 0).numpy())
    render_sheet(tiles, pics, columns=8, tile=160).save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
