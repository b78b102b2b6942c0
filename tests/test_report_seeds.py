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


def test_evaluations_of_seed_groups_are_aggregated_and_tested_per_cell(tmp_path):
    """<run>/eval/metrics.csv of each seed: per (sampler, steps, guidance) cell, mean and t-interval of FID over
    seeds per configuration, Welch + Holm between configurations at that cell, error bars in the plot."""
    fid_at = {"a": [1.40, 1.45, 1.38], "c": [2.10, 2.20, 2.05]}
    for cfg, values in fid_at.items():
        for seed, fid in enumerate(values):
            run = tmp_path / "sweep" / f"{cfg}_{seed}"
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(f"- model={cfg}\n- seed={seed}\n")
            (run / "summary.json").write_text(json.dumps({"steps": 4}))
            (run / "eval").mkdir()
            lines = [
                "sampler,steps,nfe,guidance_scale,num_samples,seed,fid_classifier,fid_classifier_lo,fid_classifier_hi"
            ]
            lines += [
                "real_val,0,0,,200,0,1.2,1.1,1.3",
                f"ddim,10,10,3.0,200,0,{fid},{fid - 0.1},{fid + 0.1}",
            ]
            lines += [f"ddim,20,20,3.0,200,0,{fid + 0.01 * seed},{fid - 0.1},{fid + 0.1}"]
            (run / "eval" / "metrics.csv").write_text("\n".join(lines) + "\n")
    result = report([tmp_path / "sweep"])
    out = tmp_path / "sweep"
    with open(out / "report_eval_seeds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["run"], r["steps"], r["seeds"]) for r in rows] == [
        ("model=a", "10", "3"),
        ("model=c", "10", "3"),
        ("model=a", "20", "3"),
        ("model=c", "20", "3"),
    ]
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=np.mean(fid_at["a"]), scale=scipy_stats.sem(fid_at["a"]))
    assert float(rows[0]["fid_classifier"]) == pytest.approx(np.mean(fid_at["a"]))
    assert (float(rows[0]["fid_classifier_lo"]), float(rows[0]["fid_classifier_hi"])) == pytest.approx(
        (lo, hi)
    )
    cell_tests = [t for t in result["seed_tests"] if t.get("sampler") == "ddim"]
    assert len(cell_tests) == 2 and all(t["significant"] for t in cell_tests)
    p = scipy_stats.ttest_ind(fid_at["a"], fid_at["c"], equal_var=False).pvalue
    assert cell_tests[0]["p"] == pytest.approx(p) and cell_tests[0]["p_holm"] == pytest.approx(p)  # one pair
    md = (out / "report.md").read_text()
    assert (
        "## Evaluations over seeds" in md and "| ddim | 10 | 3 | fid_classifier | model=a | model=c |" in md
    )
    assert (out / "metrics_vs_nfe_seeds.png").stat().st_size > 1000
