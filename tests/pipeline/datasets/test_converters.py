import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from tarfixtures import image_bytes
from PIL import Image

from pipeline.datasets.converters import (
    convert_cub,
    convert_imagefolder,
    convert_imagenet,
    parse_voc_xml,
)
from pipeline.data.reader import read_samples
from pipeline.data.shards import expand_shards
from pipeline.data.storage import read_bytes

REPO = Path(__file__).resolve().parents[3]


def make_imagefolder(root: Path) -> dict[str, bytes]:
    """cats/ (2 jpg, 1 png in a subfolder) and dogs/ (1 JPEG); returns key -> bytes."""
    files = {
        "cats/a.jpg": image_bytes(color=(10, 20, 30)),
        "cats/b.v2.jpg": image_bytes(color=(40, 50, 60)),
        "cats/more/c.png": image_bytes(fmt="PNG"),
        "dogs/d.JPEG": image_bytes(width=10, height=4),
        "dogs/notes.txt": b"not an image",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {
        "cats/a": files["cats/a.jpg"], "cats/b_v2": files["cats/b.v2.jpg"],
        "cats/c": files["cats/more/c.png"], "dogs/d": files["dogs/d.JPEG"],
    }


def test_imagefolder_round_trip_and_webdataset_reads_it(tmp_path):
    expected = make_imagefolder(tmp_path / "src")
    urls = convert_imagefolder(str(tmp_path / "src"), str(tmp_path / "out"), prefix="train", shard_size=3)
    assert [Path(u).name for u in urls] == ["train-000000.tar", "train-000001.tar"]
    assert (tmp_path / "out" / "classes.txt").read_text() == "cats\ndogs\n"
    samples = {s.key: s for u in urls for s in read_samples(u)}
    assert set(samples) == set(expected)
    for key, s in samples.items():
        assert s.ok and s.class_name == key.split("/")[0] and s.label == (0 if key.startswith("cats") else 1)
    assert (samples["dogs/d"].width, samples["dogs/d"].height) == (10, 4)
    # Interoperability: webdataset itself reads the shards, with the original bytes.
    seen = {}
    for row in wds.WebDataset(urls, shardshuffle=False):
        image_ext = next(e for e in ("jpg", "jpeg", "png") if e in row)
        seen[row["__key__"]] = (row[image_ext], int(row["cls"]))
    assert {k: v[0] for k, v in seen.items()} == expected
    assert seen["dogs/d"][1] == 1


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        convert_imagefolder(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(image_bytes())
    with pytest.raises(ValueError, match="no class subfolders"):
        convert_imagefolder(str(tmp_path / "flat"), str(tmp_path / "out"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        convert_imagefolder(str(tmp_path / "empty"), str(tmp_path / "out"))


def make_cub(root: Path) -> None:
    rows = [  # id, path, class, box (x y w h), is_train
        (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0001_1.jpg", 1, "1.0 2.0 4.0 3.0", 1),
        (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0002_2.jpg", 1, "0 0 8 6", 0),
        (3, "002.Laysan_Albatross/Laysan_Albatross_0003_3.jpg", 2, "2 1 5 4", 1),
    ]
    (root / "CUB_200_2011").mkdir(parents=True)
    cub = root / "CUB_200_2011"
    for _, rel, _, _, _ in rows:
        (cub / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (cub / "images" / rel).write_bytes(image_bytes())
        seg = root / "segmentations" / rel.replace(".jpg", ".png")
        seg.parent.mkdir(parents=True, exist_ok=True)
        soft = np.zeros((6, 8), np.uint8)
        soft[2:4, 2:5] = 200  # CUB segmentations are soft grey levels
        soft[0, 0] = 60
        Image.fromarray(soft, "L").save(seg)
    (cub / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, *_ in rows))
    (cub / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _, _ in rows))
    (cub / "bounding_boxes.txt").write_text("".join(f"{i} {b}\n" for i, _, _, b, _ in rows))
    (cub / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, *_, t in rows))
    (cub / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")


def test_cub_boxes_masks_and_splits(tmp_path):
    make_cub(tmp_path)
    urls = convert_cub(str(tmp_path / "CUB_200_2011"), str(tmp_path / "out"),
                       segmentations=str(tmp_path / "segmentations"))
    assert [Path(u).name for u in urls] == ["train-000000.tar", "test-000000.tar"]
    train = {s.key: s for s in read_samples(urls[0])}
    test = {s.key: s for s in read_samples(urls[1])}
    assert set(train) == {"Black_Footed_Albatross_0001_1", "Laysan_Albatross_0003_3"}
    assert set(test) == {"Black_Footed_Albatross_0002_2"}
    s = train["Black_Footed_Albatross_0001_1"]
    assert s.ok and s.label == 0 and s.class_name == "Black_footed_Albatross"
    assert s.gt_boxes == [[1.0, 2.0, 5.0, 5.0]]  # x, y, w, h -> x0, y0, x1, y1
    assert train["Laysan_Albatross_0003_3"].label == 1
    assert s.mask[2:4, 2:5].min() == 255 and s.mask.sum() == 6 * 255  # binarised at 0.5
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines() == [
        "Black_footed_Albatross", "Laysan_Albatross"
    ]
    only_test = convert_cub(str(tmp_path / "CUB_200_2011"), str(tmp_path / "out2"), split="test")
    assert [Path(u).name for u in only_test] == ["test-000000.tar"]


def test_cub_missing_file_is_named(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(ValueError, match="bounding_boxes.txt is missing"):
        convert_cub(str(tmp_path / "CUB_200_2011"), str(tmp_path / "out"))


VOC = """<annotation><folder>val</folder><filename>{stem}</filename>
<size><width>8</width><height>6</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>{wnid}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
       "<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>")


def voc(stem, objects):
    return VOC.format(stem=stem, objects="".join(OBJ.format(wnid=w, b=b) for w, b in objects))


def make_imagenet(root: Path) -> None:
    for wnid, n in (("n01440764", 2), ("n01443537", 1)):
        for i in range(n):
            p = root / "train" / wnid / f"{wnid}_{i}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(image_bytes())
    (root / "bbox" / "train" / "n01440764").mkdir(parents=True)
    (root / "bbox" / "train" / "n01440764" / "n01440764_0.xml").write_text(
        voc("n01440764_0", [("n01440764", (1, 1, 5, 4))]))
    (root / "val").mkdir()
    (root / "bbox" / "val").mkdir(parents=True)
    vals = {"ILSVRC2012_val_00000001": "n01443537", "ILSVRC2012_val_00000002": "n01440764"}
    for stem, wnid in vals.items():
        (root / "val" / f"{stem}.JPEG").write_bytes(image_bytes())
        (root / "bbox" / "val" / f"{stem}.xml").write_text(
            voc(stem, [(wnid, (0, 0, 4, 3)), (wnid, (2, 2, 8, 6))]))


def test_imagenet_train_and_flat_val(tmp_path):
    make_imagenet(tmp_path)
    train = convert_imagenet(str(tmp_path), str(tmp_path / "out"), split="train")
    rows = {s.key: s for u in train for s in read_samples(u)}
    assert rows["n01440764/n01440764_0"].gt_boxes == [[1.0, 1.0, 5.0, 4.0]]
    assert rows["n01440764/n01440764_1"].gt_boxes is None
    assert rows["n01443537/n01443537_0"].label == 1 and rows["n01443537/n01443537_0"].class_name == "n01443537"
    (tmp_path / "wnids.txt").write_text("n01440764\nn01443537\n")
    val = convert_imagenet(str(tmp_path), str(tmp_path / "outval"), split="val",
                           class_index=str(tmp_path / "wnids.txt"))
    vrows = {s.key: s for u in val for s in read_samples(u)}
    v1 = vrows["ILSVRC2012_val_00000001"]
    assert v1.label == 1 and v1.class_name == "n01443537"
    assert v1.gt_boxes == [[0.0, 0.0, 4.0, 3.0], [2.0, 2.0, 8.0, 6.0]]
    assert vrows["ILSVRC2012_val_00000002"].label == 0
    # Without a class index, the classes found in the XML files are numbered in sorted order.
    unindexed = convert_imagenet(str(tmp_path), str(tmp_path / "outval2"), split="val")
    assert {s.key: s.label for u in unindexed for s in read_samples(u)} == {k: s.label for k, s in vrows.items()}


def test_parse_voc_xml():
    objects, size = parse_voc_xml(voc("x", [("a", (1, 2, 3, 4)), ("b", (5, 6, 7, 8))]).encode())
    assert size == (8, 6) and objects == [("a", [1.0, 2.0, 3.0, 4.0]), ("b", [5.0, 6.0, 7.0, 8.0])]


def test_shard_size_by_bytes_and_output_to_s3(tmp_path, s3_env):
    src = tmp_path / "src"
    for i in range(6):
        p = src / "c" / f"n{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(noise).save(p)  # ~5 KB each, incompressible
    size = (src / "c" / "n0.png").stat().st_size
    out = f"s3://{s3_env.bucket}/test_converters/"
    urls = convert_imagefolder(str(src), out, shard_size=100, max_bytes=int(2.5 * (size + 2048)))
    assert len(urls) == 3 and urls == expand_shards(out)
    assert read_bytes(out + "classes.txt") == b"c\n"
    assert sum(1 for u in urls for s in read_samples(u) if s.ok) == 6


def test_cli_converts_and_fails_clearly(tmp_path):
    make_imagefolder(tmp_path / "src")
    ok = subprocess.run(
        [sys.executable, "jobs/make_shards.py", "imagefolder", "--src", str(tmp_path / "src"),
         "--out", str(tmp_path / "out"), "--prefix", "pets", "--shard-size", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "done: 2 shards" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "jobs/make_shards.py", "cub", "--src", str(tmp_path / "nothing"), "--out",
         str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "images.txt is missing" in bad.stderr


def test_cli_names_a_missing_bucket(tmp_path, s3_env):
    import os

    make_imagefolder(tmp_path / "src")
    done = subprocess.run(
        [sys.executable, "jobs/make_shards.py", "imagefolder", "--src", str(tmp_path / "src"),
         "--out", "s3://missing-bucket/wds/"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    assert done.returncode == 2
    assert "'missing-bucket'" in done.stderr and s3_env.endpoint in done.stderr
    assert s3_env.secret_key not in done.stderr + done.stdout
