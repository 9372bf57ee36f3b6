"""Write WebDataset shards: the synthetic WSOL set, or a conversion of an image folder,
CUB-200-2011 or ImageNet (DESIGN §2).

    python jobs/make_shards.py synthetic --out data/syn --split train --num-samples 5000 --seed 0
    python jobs/make_shards.py imagefolder --src photos/ --out s3://bucket/wds/ --prefix train
    python jobs/make_shards.py cub --src CUB_200_2011/ --out s3://bucket/cub/
    python jobs/make_shards.py imagenet --src ILSVRC/ --split val --out s3://bucket/imagenet/
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.datasets import converters
from pipeline.datasets import synthetic  # noqa: E402
from pipeline.data.storage import check_writable  # noqa: E402


def _add_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output prefix: a directory or any fsspec URL")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", type=float, default=1024.0, help="MiB per shard at most")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="the synthetic WSOL data set (docs/synthetic_data.md)")
    _add_size_args(p)
    p.add_argument("--split", required=True, help="split name, e.g. train, val or test (also seeds it)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--family", choices=synthetic.FAMILIES, default="birds")

    p = sub.add_parser("imagefolder", help="a folder with one subfolder of images per class")
    _add_size_args(p)
    p.add_argument("--src", required=True)
    p.add_argument("--prefix", default="train", help="shard name prefix")

    p = sub.add_parser("cub", help="CUB-200-2011 (images.txt, bounding_boxes.txt, ...)")
    _add_size_args(p)
    p.add_argument("--src", required=True, help="the CUB_200_2011 folder")
    p.add_argument("--split", choices=("train", "test"), default=None, help="default: both")
    p.add_argument("--segmentations", default=None, help="folder of CUB segmentation PNGs, for masks")

    p = sub.add_parser("imagenet", help="ImageNet: class folders (train), VOC XML boxes (val)")
    _add_size_args(p)
    p.add_argument("--src", required=True, help="the folder holding train/ and val/ (and bbox dirs)")
    p.add_argument("--split", choices=("train", "val"), required=True)
    p.add_argument("--boxes", default=None, help="folder of PASCAL-VOC XML files (default: SRC/bbox/SPLIT)")
    p.add_argument("--class-index", default=None, help="text file of wnids, one a line, in label order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    max_bytes = int(args.shard_bytes * 2**20)
    try:
        check_writable(args.out)  # a missing bucket or bad keys fail before any work
        if args.command == "synthetic":
            urls = synthetic.write_synthetic_shards(
                args.out, args.split, args.num_samples, args.seed, image_size=args.image_size,
                shard_size=args.shard_size, num_classes=args.num_classes, family=args.family,
                max_bytes=max_bytes,
            )
        elif args.command == "imagefolder":
            urls = converters.convert_imagefolder(
                args.src, args.out, prefix=args.prefix, shard_size=args.shard_size, max_bytes=max_bytes
            )
        elif args.command == "cub":
            urls = converters.convert_cub(
                args.src, args.out, split=args.split, segmentations=args.segmentations,
                shard_size=args.shard_size, max_bytes=max_bytes,
            )
        else:
            urls = converters.convert_imagenet(
                args.src, args.out, split=args.split, boxes=args.boxes, class_index=args.class_index,
                shard_size=args.shard_size, max_bytes=max_bytes,
            )
    except (ValueError, OSError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {len(urls)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
