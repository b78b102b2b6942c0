"""Seeds as an axis in `report`: t-intervals per configuration, Welch's t + Holm between configurations (vs scipy),
the verdict in report.md, the tests CSV and the error-bar plot."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from diffusion_lab.metrics.intervals import holm
from diffusion_lab.report import report

FID = {"a": [1.40, 1.45, 1.38], "b": [1.42, 1.50, 1.36], "c": [2.10, 2.20, 2.05]}  # c is clearly worse


def test_seed_groups_get_intervals_and_a_verdict(tmp_path):
    for j, (cfg, values) in enumerate((c, v) for c, vs in FID.items() for v in [vs]):
        for seed, fid in enumerate(values):
            run = tmp_path / "sweep" / f"{j}_{seed}"
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(f"- model={cfg}\n- seed={seed}\n")
            (run / "summary.json").write_text(json.dumps({"steps": 4, "fid": fid}))
    result = report([tmp_path / "sweep"])
    by_label = {r["run"]: r for r in result["seed_rows"]}
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=np.mean(FID["a"]), scale=scipy_stats.sem(FID["a"]))
    assert (by_label["model=a"]["fid_lo"], by_label["model=a"]["fid_hi"]) == pytest.approx((lo, hi))
    tests = {(t["a"], t["b"]): t for t in result["seed_tests"]}
    assert set(tests) == {("model=a", "model=b"), ("model=a", "model=c"), ("model=b", "model=c")}
    ps = [scipy_stats.ttest_ind(FID[x], FID[y], equal_var=False).pvalue for x, y in ("ab", "ac", "bc")]
    assert [t["p"] for t in tests.values()] == pytest.approx(ps)
    assert [t["p_holm"] for t in tests.values()] == pytest.approx(holm(ps))
    assert [t["significant"] for t in tests.values()] == [False, True, True]
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "Welch's t-test" in md and "Holm" in md and "| fid | model=a | model=c |" in md
    assert "| fid | model=a | model=b |" not in md  # not significant: only in the CSV
    with open(tmp_path / "sweep" / "report_tests.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert (tmp_path / "sweep" / "final_metrics_seeds.png").stat().st_size > 1000
