"""bench/fidelity.py's reporting: paired comparisons and merging of per-run CSVs (no training)."""

import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
fidelity = pytest.importorskip("fidelity")

ENV = dict(date="2026-01-01T00:00Z", device="cpu", git="abc", torch="x", triton="x", transformers="x")


def row(task, variant, seed, metric, final_N="12/12"):
    return dict(task=task, arch="mamba", seed=seed, variant=variant, metric=metric, final_N=final_N, wall_s=1.0,
                train_loss_at_10pct=2.0, note="", steps=400, seq_len=512, batch=4, lr=0.01, estimator="mean_lti",
                tau=0.05, threads=1, **ENV)


def test_paired_differences_are_signed_so_that_positive_means_better():
    rows = [row("lm", "b-rank", s, 2.9 + 0.01 * s) for s in range(3)]
    rows += [row("lm", "c-rank", s, 3.0) for s in range(3)]
    rows += [row("digits", "b-rank", s, 0.5) for s in range(2)] + [row("digits", "c-rank", s, 0.6) for s in range(3)]
    by_task = {(p["task"], p["x"], p["y"]): p for p in fidelity.paired(rows)}
    lm = by_task[("lm", "b-rank", "c-rank")]
    assert lm["seeds"] == 3 and lm["wins"] == 3 and lm["mean"] == pytest.approx(0.09)  # lower bits per byte wins
    digits = by_task[("digits", "b-rank", "c-rank")]
    assert digits["seeds"] == 2 and digits["wins"] == 0 and digits["mean"] == pytest.approx(-0.1)  # only shared seeds
    assert ("lm", "b-rank", "a") not in by_task  # no rows for (a): no pair


def test_merge_writes_one_table_from_several_csvs(tmp_path):
    pytest.importorskip("matplotlib", reason="the merged table comes with a plot")
    paths = []
    for name, rows in (("one", [row("lm", "b-tau", 0, 2.9, "20/30"), row("lm", "c-tau", 0, 3.0, "20/30")]),
                       ("two", [row("lm", "b-tau", 1, 2.8, "25/18"), row("lm", "c-tau", 1, 2.7, "25/18")])):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths.append(str(path))
    fidelity.main(["--merge", *paths, "--out", str(tmp_path / "merged")])
    md = (tmp_path / "merged.md").read_text()
    assert "| lm | mamba | b-tau | 2 | 2.8500 ± 0.0707 | 20/30; 25/18 |" in md
    assert "| lm | mamba | b-tau vs c-tau | the same at tolerance tau | +0.0000 ± 0.1414 | 1/2 |" in md
    assert (tmp_path / "merged.png").stat().st_size > 0
    with open(tmp_path / "merged.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_unknown_variant_is_an_error():
    with pytest.raises(SystemExit):
        fidelity.main(["--variants", "a,b-bogus"])
