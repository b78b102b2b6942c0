"""lightning-hydra-template conventions: debug configs without the expensive callbacks, an Optuna sweep that picks by
a quality metric, the config tree, optional local overrides, a step-based progress bar, a quiet console."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusion_lab.callbacks.progress import StepProgressBar
from diffusion_lab.console import NOISE
from diffusion_lab.train import optimized_value, train

from conftest import CONF_DIR, TINY, compose

REPO = Path(__file__).resolve().parents[1]
DEBUG = sorted(p.stem for p in (Path(CONF_DIR) / "debug").glob("*.yaml"))


def _tiny_without(*prefixes: str) -> list[str]:
    return [o for o in TINY if not o.startswith(prefixes)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


@pytest.mark.parametrize("name", DEBUG)
def test_debug_configs_switch_off_the_expensive_callbacks(name, tmp_path):
    assert set(DEBUG) >= {"default", "overfit", "limit", "profiler"}
    cfg = compose("train", [f"debug={name}", "logger=wandb"], tmp_path)
    assert cfg.task_name == "debug"
    assert all(cfg.callbacks.get(k) is None for k in ("image_logger", "class_accuracy", "fid", "adherence"))
    assert cfg.callbacks.ema is not None and cfg.callbacks.checkpoint is not None  # cheap ones stay
    assert list(k for k, v in cfg.logger.items() if v is not None) == ["csv"]


def test_debug_default_is_one_quick_step_of_the_quickstart(tmp_path):
    summary = train(
        compose("train", ["debug=default", "trainer.enable_progress_bar=false"], tmp_path / "run")
    )
    assert summary["steps"] == 1 and summary["wall_seconds"] < 15  # was 23 s with grids and class accuracy
    assert "class_accuracy" not in summary and not list((tmp_path / "run").glob("samples/*.png"))


def test_debug_overfit_trains_on_one_batch(tmp_path):
    over = [
        "debug=overfit",
        *_tiny_without("callbacks.image_logger", "callbacks.class_accuracy"),
        "trainer.max_steps=3",
    ]
    summary = train(compose("train", over, tmp_path / "run"))
    assert summary["steps"] == 3 and summary["epochs"] == 3  # one batch per epoch


def test_optimized_value_is_the_named_summary_figure():
    summary = {"final_train_loss": 0.5, "class_accuracy": 0.9, "sample_grids": ["a.png"]}
    assert optimized_value(summary, "class_accuracy", required=True) == 0.9
    assert optimized_value(summary, None, required=True) is None
    assert optimized_value(summary, "fid_classifier", required=False) is None
    with pytest.raises(ValueError, match="numbers: class_accuracy, final_train_loss"):
        optimized_value(summary, "fid_classifier", required=True)


@pytest.mark.slow
def test_optuna_sweep_picks_the_trial_with_the_best_class_accuracy(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'diffusion_lab[optuna]'")
    sweep = tmp_path / "sweep"
    tiny = _tiny_without("trainer.max_steps", "callbacks.image_logger")
    cmd = [sys.executable, "-m", "diffusion_lab.train", "hparams_search=quickstart_optuna", *tiny]
    cmd += ["trainer.max_steps=12", "callbacks.ema=null", "callbacks.image_logger=null"]
    cmd += ["callbacks.class_accuracy.num_per_class=5", "print_config=false", "hydra.sweeper.n_trials=4"]
    cmd += ["hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        summary = json.loads((job / "summary.json").read_text())
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        trials.append((summary, {k: v for k, v in (o.split("=", 1) for o in overrides) if k in SEARCHED}))
    assert len(trials) == 4
    accuracies = [s["class_accuracy"] for s, _ in trials]
    assert len(set(accuracies)) > 1, accuracies  # else the test could not tell what was optimised
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == max(accuracies)  # the quality metric, maximised; not the training loss
    best = [params for s, params in trials if s["class_accuracy"] == max(accuracies)]
    assert {k: str(v) for k, v in result["best_params"].items()} in best


SEARCHED = ("model.optimizer.lr", "model.cond_drop_prob", "model.objective")


def test_config_tree_is_printed_and_saved(tmp_path, capsys):
    train(compose("train", [*TINY, "callbacks.class_accuracy=null"], tmp_path / "run"))
    tree = (tmp_path / "run" / "config_tree.log").read_text()
    assert tree.startswith("CONFIG") and "_target_: diffusion_lab.systems.diffusion.DiffusionSystem" in tree
    assert tree.index("data") < tree.index("model") < tree.index("trainer")  # groups in the template's order
    assert "DiffusionSystem" in capsys.readouterr().out


def test_optional_local_overrides_apply_when_present(tmp_path):
    local = Path(CONF_DIR) / "local" / "test_only_local.yaml"  # git-ignored folder, removed below
    local.write_text("# @package _global_\nseed: 77\ntags: [mine]\n")
    try:
        assert compose("train", [], tmp_path).seed == 0  # no local/default.yaml in the checkout: skipped
        cfg = compose("train", ["local=test_only_local"], tmp_path)
        assert cfg.seed == 77 and list(cfg.tags) == ["mine"]
    finally:
        local.unlink()


class _Probe(StepProgressBar):
    """Records the bar's (n, total) after every step and at every epoch start."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int | None]] = []
        self.epoch_starts: list[int] = []

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.epoch_starts.append(self.train_progress_bar.n)

    def on_train_batch_end(self, trainer, *args) -> None:
        super().on_train_batch_end(trainer, *args)
        self.seen.append((self.train_progress_bar.n, self.train_progress_bar.total))


def test_progress_bar_counts_steps_across_epochs(tmp_path):
    over = [*TINY, "trainer.enable_progress_bar=true", "+trainer.limit_train_batches=2"]
    over += ["callbacks.class_accuracy=null", "callbacks.image_logger=null"]
    probe = _Probe()
    train(compose("train", over, tmp_path / "run"), extra_callbacks=[probe])
    assert probe.seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # step / max_steps, never reset
    assert probe.epoch_starts == [0, 2]  # two epochs of two batches, one bar


@pytest.mark.slow
def test_console_of_a_run_has_no_warning_line(tmp_path):
    """The quickstart's settings (log_every_n_steps 25 > 22 batches per epoch, EMA, grids, class accuracy) with a
    short budget, plus wandb offline: stdout + stderr hold no warning, none of the known noise."""
    cmd = [sys.executable, "-m", "diffusion_lab.train", "trainer.max_steps=3", "logger=wandb"]
    cmd += [
        "callbacks.class_accuracy.num_per_class=1",
        "callbacks.image_logger.num_samples=10",
        "hydra.run.dir=run",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert not [line for line in out.splitlines() if re.search(r"warn|deprecat", line, re.IGNORECASE)], out
    for pattern in [p for _, p, _ in NOISE] + ["litlogger", "weights_only", "anonymous", "sharding"]:
        assert not re.search(pattern, out), pattern
    assert "CONFIG" in out and '"class_accuracy"' in out and "train: 100%" in out  # tree, summary, bar
