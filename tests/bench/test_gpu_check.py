"""bench/gpu_check.sh --smoke: the device check runs end to end on CPU, so it cannot rot
between the sessions that have a GPU to run it on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "figures"
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--smoke", str(out)], cwd=REPO, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["exit_codes"] == {"a": 0, "b": 0, "c": 0, "d": 0}

    tests = summary["cuda_tests"]  # skipped here; run (and passed) on a machine with a GPU
    assert tests["tests"] >= 7 and tests["failures"] == tests["errors"] == 0
    assert tests["passed"] + tests["skipped"] == tests["tests"]

    forward = summary["forward"]["forward"]["bf16"]
    assert forward["sat_img_s"] > 0 and forward["deit_img_s"] > 0
    assert forward["sat_over_deit_time"] == pytest.approx(forward["deit_img_s"] / forward["sat_img_s"])

    localize = summary["localize"]
    assert localize["imagenet_like"] is True and localize["images"] == 24
    assert set(localize["decode"]) == {"cpu", "batched"}
    for run in localize["decode"].values():
        assert run["img_s"] > 0 and run["cpu_fallbacks"] == 0
        assert run["of_bare_forward"] == pytest.approx(run["img_s"] / localize["bare_forward_img_s"], rel=0.5)

    train = summary["train"]
    assert train["real"]["how"] == "in-process" and train["loader_workers"] == 1
    assert 0 <= train["real"]["input_wait_share"] < 1
    assert train["of_bare_step"] == pytest.approx(train["real"]["img_s"] / train["bare_step_img_s"])

    assert set(summary["goals"]) == {
        "sat_over_deit_forward_bf16", "localize_cpu_decode_of_bare_forward",
        "localize_batched_decode_of_bare_forward", "train_of_bare_step",
    }
    assert "[gpu_check] figures in" in proc.stdout


def test_gpu_check_refuses_a_missing_outdir_argument():
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: bench/gpu_check.sh [--smoke] OUTDIR" in proc.stderr
