"""report end to end: a real 4-run sweep of an ablation experiment -> report.md / .csv / plots, values = summary.json."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_lab.report import ReportError, Run, main, name_runs, read_curves, report

from conftest import CONF_DIR, TINY

ROOT = Path(CONF_DIR).parent
# process x loss weighting from ablation_objective's grid; objective pinned on the command line
EXPECTED_LABELS = {
    f"process={n}, model.loss_weighting={w}" for n in ("linear", "cosine") for w in ("uniform", "min_snr")
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python -m diffusion_lab.train -m experiment=ablation_objective model.objective=eps` (tiny): 4 runs."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "diffusion_lab.train",
        "-m",
        "experiment=ablation_objective",
        "model.objective=eps",
        *TINY,
        f"hydra.sweep.dir={out}",
        "hydra.sweep.subdir=${hydra.job.num}",  # the tiny overrides make a folder name over 255 characters
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _png(path: Path) -> np.ndarray:
    assert path.is_file(), path
    img = np.asarray(Image.open(path).convert("L"))
    assert img.shape[0] > 150 and img.shape[1] > 300 and img.std() > 5, (path, img.shape)  # a drawn plot
    return img


def test_report_of_a_four_run_sweep(sweep, tmp_path, caplog):
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert len(runs) == 4

    # a real evaluate folder in run 0 (<run>/eval), logged to wandb as a table
    from hydra import compose, initialize_config_dir

    from diffusion_lab.evaluate import evaluate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ecfg = compose(
            "evaluate",
            [
                f"ckpt={runs[0] / 'checkpoints' / 'last.ckpt'}",
                "samplers=[ddim,euler]",
                "steps=[2,3]",
                "num_samples=8",
                "features=[random]",
                "metrics=[fid]",
                "reference_split=null",
                f"cache_dir={tmp_path / 'cache'}",
                "progress=false",
                "logger=wandb",
            ],
        )
    erows = evaluate(ecfg)
    tables = list(
        (runs[0] / "eval" / "wandb").glob("offline-run-*/files/media/table/eval/metrics_*.table.json")
    )
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[table["columns"].index("fid_random")] for row in table["data"]] == [
        r["fid_random"] for r in erows
    ]

    with caplog.at_level("INFO", logger="diffusion_lab.report"):
        main([str(sweep)])
    assert f"report: 4 run(s), 1 evaluation(s) -> {sweep / 'report.md'}" in caplog.text

    with open(sweep / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    # runs are named by what differs between them: not the experiment, the tiny sizes or objective
    assert {r["run"] for r in rows} == EXPECTED_LABELS
    for row in rows:
        summary = json.loads((sweep / row["folder"] / "summary.json").read_text())
        overrides = (sweep / row["folder"] / ".hydra" / "overrides.yaml").read_text()
        assert (
            f"process={row['process']}" in overrides
            and f"model.loss_weighting={row['model.loss_weighting']}" in overrides
        )
        for key in (
            "final_train_loss",
            "class_accuracy",
            "wall_seconds",
            "steps",
            "classifier_real_accuracy",
        ):
            assert float(row[key]) == summary[key], key
        assert row["steps"] == "4" and row["status"] == "done"
        assert "final_val_loss" not in row  # null in every run: no empty column
        # the loss curve is the CSV log, ending at the summary's final loss
        run = Run(path=sweep / row["folder"], overrides=[], summary=summary)
        curve = read_curves(run)["train/loss"]
        assert [s for s, _ in curve] == [0, 1, 2, 3] and curve[-1][1] == pytest.approx(
            summary["final_train_loss"]
        )

    md = (sweep / "report.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| process=")]
    assert len(table_rows) == 4 + len(erows)  # the runs table, then the evaluation rows of run 0
    assert {line.split(" | ")[0].lstrip("| ") for line in table_rows[:4]} == EXPECTED_LABELS
    assert "`experiment=ablation_objective`" in md  # listed once, as shared by every run

    with open(sweep / "report_eval.csv", newline="") as fh:
        eval_csv = list(csv.DictReader(fh))
    run0 = next(r["run"] for r in rows if r["folder"] == runs[0].name)
    assert [r["run"] for r in eval_csv] == [run0] * len(erows) == [run0] * 4
    assert [float(r["fid_random"]) for r in eval_csv] == [r["fid_random"] for r in erows]
    assert [int(r["nfe"]) for r in eval_csv] == [r["nfe"] for r in erows]

    for name in ("loss_curves.png", "final_metrics.png", "metrics_vs_nfe.png"):
        _png(sweep / name)
        assert f"]({name})" in md


def test_report_of_several_run_folders_into_out(sweep, tmp_path):
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))[:2]
    result = report(runs, tmp_path / "rep")
    assert result["runs"] == 2 and (tmp_path / "rep" / "report.md").is_file()
    assert [r["run"] for r in result["rows"]] == [
        "model.loss_weighting=uniform",
        "model.loss_weighting=min_snr",
    ]


def test_names_drop_shared_and_location_overrides(tmp_path):
    def run(name, *overrides):
        return Run(path=tmp_path / name, overrides=list(overrides), summary={})

    runs = [
        run("0", "experiment=x", "noise=linear", "+trainer.a=1", "paths.output_dir=/a", "hydra.verbose=true"),
        run("1", "experiment=x", "noise=cosine", "+trainer.a=2", "paths.output_dir=/b"),
        run("2", "experiment=x", "noise=cosine", "+trainer.a=2", "paths.output_dir=/c"),
    ]
    name_runs(runs, tmp_path)
    assert [r.label for r in runs] == [
        "noise=linear, trainer.a=1",
        "noise=cosine, trainer.a=2 (1)",  # the same overrides: the folder tells them apart
        "noise=cosine, trainer.a=2 (2)",
    ]
    assert runs[0].varying == {"noise": "linear", "trainer.a": "1"}
    single = [run("only", "noise=linear")]
    name_runs(single, tmp_path)
    assert single[0].label == "only"


def test_report_errors_are_clear(tmp_path, caplog):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ReportError, match="no runs under .*empty"):
        report([tmp_path / "empty"])
    with pytest.raises(ReportError, match="not a folder"):
        report([tmp_path / "missing"])
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "empty")])
    assert e.value.code == 1
    assert "error: no runs under" in caplog.text


def test_seeds_are_aggregated_constants_listed_once_and_final_grids_montaged(tmp_path):
    """Four runs, noise x seed: mean +- std per noise over its two seeds, `steps` (4 everywhere) listed once,
    one montage panel per run from its last sample grid."""
    accuracy = {("linear", 0): 0.50, ("linear", 1): 0.70, ("cosine", 0): 0.90, ("cosine", 1): 0.80}
    for j, ((noise, seed), acc) in enumerate(accuracy.items()):
        run = tmp_path / "sweep" / str(j)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- noise={noise}\n- seed={seed}\n")
        grid = run / "samples" / "step_000004.png"
        grid.parent.mkdir()
        Image.fromarray(np.full((20, 20), 60 * j, dtype=np.uint8)).save(grid)
        summary = {"steps": 4, "class_accuracy": acc, "sample_grids": [str(grid)]}
        (run / "summary.json").write_text(json.dumps(summary))
    result = report([tmp_path / "sweep"])
    by_label = {r["run"]: r for r in result["seed_rows"]}
    assert set(by_label) == {"noise=linear", "noise=cosine"} and by_label["noise=linear"]["n"] == 2
    assert by_label["noise=linear"]["class_accuracy_mean"] == pytest.approx(0.60)
    assert by_label["noise=linear"]["class_accuracy_std"] == pytest.approx(0.1414213562)  # sample std
    assert by_label["noise=cosine"]["class_accuracy_mean"] == pytest.approx(0.85)
    with open(tmp_path / "sweep" / "report_seeds.csv", newline="") as fh:
        assert float(list(csv.DictReader(fh))[0]["class_accuracy_mean"]) == pytest.approx(0.60)
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "Same in every run: steps = 4" in md
    header = next(line for line in md.splitlines() if line.startswith("| run | class_accuracy"))
    assert "steps" not in header  # the constant column is not repeated per run
    assert "| noise=linear | 2 | 0.6 ± 0.1414 |" in md
    montage = _png(tmp_path / "sweep" / "final_grids.png")
    assert "](final_grids.png)" in md and montage.shape[1] > 4 * 100  # four panels side by side
