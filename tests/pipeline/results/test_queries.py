"""Run every DuckDB recipe of docs/queries.md on Parquet written with the real schema.

The SQL is parsed out of the doc (a ``### name`` heading, then a ```sql block), so the
doc and this test cannot drift apart: a recipe that breaks, or one added without a check
here, fails.
"""
from __future__ import annotations

import os
import re

import duckdb
import pytest

from run_factory import make_row, write_run

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "docs", "queries.md")
SHARD1 = "data/shard-000001.tar"


def recipes() -> dict[str, str]:
    text = open(DOC, encoding="utf-8").read()
    found = {}
    for name, sql in re.findall(r"^### (\w+)\s*\n.*?```sql\n(.*?)```", text, flags=re.S | re.M):
        found[name] = sql
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    scores = lambda top: [top, 0.01, 0.01, 0.01, 0.01]  # noqa: E731
    a = {
        "shard-000000": [
            make_row("k1", label=0, class_name="cat", score=0.9, fg_ratio=0.2, gt_label=0,
                     boxes=[(0.0, 0.0, 224.0, 224.0, 0.9)]),
            make_row("k2", label=1, class_name="dog", score=0.6, fg_ratio=0.25, gt_label=0, topk=[1, 0, 2, 3, 4],
                     boxes=[(0.0, 0.0, 112.0, 112.0, 0.6)]),
            make_row("k3", label=0, class_name="cat", score=0.3, fg_ratio=0.25, boxes=[(10.0, 10.0, 20.0, 20.0, 0.3)]),
        ],
        "shard-000001": [
            make_row("k4", status="error", error="truncated tar", shard=SHARD1),
            make_row("k5", label=1, class_name="dog", score=0.8, gt_label=2, topk=[1, 2, 3, 4, 5], shard=SHARD1,
                     boxes=[(0.0, 0.0, 224.0, 112.0, 0.8), (0.0, 150.0, 20.0, 170.0, 0.1)]),
        ],
    }
    b = {
        "shard-000000": [
            make_row("k1", label=0, class_name="cat", score=0.95, boxes=[(0.0, 0.0, 224.0, 224.0, 0.9)]),
            make_row("k2", label=0, class_name="cat", score=0.5, boxes=[(0.0, 0.0, 112.0, 112.0, 0.6)]),
            make_row("k3", label=0, class_name="cat", score=0.4, boxes=[(15.0, 10.0, 25.0, 20.0, 0.3)]),
            make_row("k6", label=2, class_name="bird", score=0.7),
        ]
    }
    for row in a["shard-000000"] + a["shard-000001"]:
        if row["status"] == "ok":
            row["topk_scores"] = scores(row["score"])
    return write_run(root, "run_a", a), write_run(root, "run_b", b)


def _query(name: str, runs) -> list[tuple]:
    sql = recipes()[name].replace("{run}", runs[0]).replace("{run_b}", runs[1])
    return duckdb.connect().execute(sql).fetchall()


def test_every_recipe_in_the_doc_is_checked():
    assert set(recipes()) == {
        "per_class", "least_confident", "box_size_distribution", "boxes_per_image", "errors_by_shard",
        "accuracy_where_labelled", "compare_runs", "compare_runs_summary",
    }


def test_per_class(runs):
    assert _query("per_class", runs) == [("cat", 2, 0.6, 0.225), ("dog", 2, 0.7, 0.25)]


def test_least_confident(runs):
    rows = _query("least_confident", runs)
    assert [r[0] for r in rows] == ["k3", "k2", "k5", "k1"]
    assert rows[0] == ("k3", "data/shard-000000.tar", "cat", 0.3, 1, 0.29)


def test_box_size_distribution(runs):
    assert _query("box_size_distribution", runs) == [(0.0, 1), (0.2, 1), (0.5, 1), (0.9, 1)]


def test_boxes_per_image(runs):
    assert _query("boxes_per_image", runs) == [(1, 3), (2, 1)]


def test_errors_by_shard(runs):
    assert _query("errors_by_shard", runs) == [(SHARD1, 1, "truncated tar")]


def test_accuracy_where_labelled(runs):
    assert _query("accuracy_where_labelled", runs) == [(3, 33.33, 100.0)]


def test_compare_runs(runs):
    assert _query("compare_runs", runs) == [("k3", 0, 0, 0.3, 0.4, 0.3333), ("k2", 1, 0, 0.6, 0.5, 1.0)]


def test_compare_runs_summary(runs):
    assert _query("compare_runs_summary", runs) == [(3, 66.67, 0.7778)]
