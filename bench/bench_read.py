"""Read + decode + resize throughput, and memory while streaming a large shard.

Prints (never pass/fail):
- samples/s of read_samples + resize_to_input from local disk and from a local S3
  endpoint (SeaweedFS), against raw PIL decode + resize of the same JPEG bytes held in
  memory (the limit on these cores), and the ratio (target >= 0.8);
- peak RSS growth while streaming a large shard of random-noise JPEGs, from disk and from
  S3, next to the largest sample (target: a small multiple of it).

    python bench/bench_read.py [--images 400] [--size 224] [--big-mb 200]
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from infra.local.s3_store import LocalS3Store  # noqa: E402
from pipeline.data.preprocess import resize_to_input  # noqa: E402
from pipeline.data.reader import read_samples  # noqa: E402
from pipeline.datasets.webdataset_writer import ShardWriter  # noqa: E402


def photo_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs (about 400x330, smooth content plus texture, quality 90)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(320, 500)), int(rng.integers(260, 400))
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        base += rng.normal(0, 12, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def noise_jpegs(total_mb: float, seed: int = 1) -> tuple[list[bytes], int]:
    """Random-noise JPEGs (incompressible, ~1-2 MB each) adding up to about total_mb."""
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < total_mb * 2**20:
        side = int(rng.integers(700, 1000))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
        size += len(out[-1])
    return out, size


def write_shard(directory: str, prefix: str, images: list[bytes]) -> str:
    with ShardWriter(directory, prefix, max_count=len(images), max_bytes=1 << 40, progress=None) as w:
        for i, data in enumerate(images):
            w.write(f"s{i:06d}", {"jpg": data, "cls": b"0"})
    return w.urls[0]


def best_rates(fns: dict, n: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(samples/s, CPU ms/sample) of each function, best of ``repeats`` runs taken in
    turns, so that load from other processes on the shared cores hits every variant
    alike. CPU time counts every thread of this process (prefetch and S3 I/O included)."""
    wall = {name: float("inf") for name in fns}
    cpu = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            count = fn()
            wall[name] = min(wall[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
            assert count == n, f"{name}: expected {n} samples, got {count}"
    return {name: (n / wall[name], 1000 * cpu[name] / n) for name in fns}


def raw_decode_resize(images: list[bytes], size: int) -> int:
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
        np.asarray(img)
    return len(images)


def ours(url: str, size: int) -> int:
    n = 0
    for s in read_samples(url):
        resize_to_input(s.image, size)
        n += 1
    return n


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_peak_rss(url: str) -> None:
    """Run in a fresh process: RSS before reading and peak RSS while reading, in KiB.

    The kernel's peak-RSS mark is reset first (clear_refs 5), so import-time peaks do
    not hide the reader's own; where that is not allowed, ru_maxrss is the fallback.
    """
    from pipeline.data.reader import read_samples as read  # imported before the baseline
    from pipeline.data.storage import url_to_fs

    # One metadata request first: the S3 client loads its service model (~20 MiB, once
    # per process), which is not the cost of reading a shard.
    fs, path = url_to_fs(url)
    fs.info(path)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _proc_status_kib("VmRSS")
        peak_of = lambda: _proc_status_kib("VmHWM")  # noqa: E731
    except OSError:
        start = _proc_status_kib("VmRSS")
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    n = 0
    for s in read(url):
        n += s.ok
    print(f"{start} {peak_of()} {n}")


def peak_rss_growth(url: str, env: dict) -> tuple[float, int]:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child-rss", url],
        env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )
    start, peak, n = (int(v) for v in done.stdout.split())
    return (peak - start) / 1024, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--big-mb", type=float, default=200.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        child_peak_rss(args.child_rss)
        return

    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp, LocalS3Store() as store:
        os.environ.update(store.env())
        images = photo_like_jpegs(args.images)
        local = write_shard(tmp, "photos", images)
        s3 = write_shard(f"s3://{store.bucket}/bench", "photos", images)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        print(f"{len(images)} photo-like JPEGs, mean {mean_kb:.0f} KiB, resized to {args.size}x{args.size}, 1 thread")
        rates = best_rates(
            {
                "raw": lambda: raw_decode_resize(images, args.size),
                "disk": lambda: ours(local, args.size),
                "s3": lambda: ours(s3, args.size),
            },
            len(images),
            args.repeats,
        )
        raw, raw_cpu = rates["raw"]
        print(f"  raw PIL decode+resize from memory : {raw:7.1f} samples/s  {raw_cpu:5.2f} CPU ms/sample")
        for name, label in (("disk", "local disk"), ("s3", "local S3  ")):
            rate, cpu = rates[name]
            print(f"  read_samples+resize, {label}   : {rate:7.1f} samples/s  {cpu:5.2f} CPU ms/sample"
                  f"  ratio {rate / raw:.2f} (by CPU time {raw_cpu / cpu:.2f})")

        big, big_bytes = noise_jpegs(args.big_mb)
        largest = max(map(len, big))
        big_local = write_shard(tmp, "noise", big)
        big_s3 = write_shard(f"s3://{store.bucket}/bench", "noise", big)
        with Image.open(io.BytesIO(max(big, key=len))) as im:
            decoded_mb = im.size[0] * im.size[1] * 3 / 2**20
        print(f"big shard: {len(big)} noise JPEGs, {big_bytes / 2**20:.0f} MiB; largest sample "
              f"{largest / 2**20:.2f} MiB (decoded about {decoded_mb:.1f} MiB)")
        for name, url in (("local disk", big_local), ("local S3", big_s3)):
            growth, n = peak_rss_growth(url, store.env())
            print(f"  peak RSS growth reading it from {name:10s}: {growth:6.1f} MiB "
                  f"= {growth / (largest / 2**20):.1f}x the largest sample ({n} samples decoded)")


if __name__ == "__main__":
    main()
