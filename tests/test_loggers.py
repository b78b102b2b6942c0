"""Every logger at once (`logger=many`): CSV beside the others, the composed config logged once (no flat
duplicates from the system), summary.json's figures in wandb's summary / TensorBoard's HParams / MLflow's
metrics, sample grids through the one image path; MLflow offline on a file store."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from run_if import RunIf, installed

import diffusion_lab.train as train_module
from diffusion_lab.train import train

from conftest import CONF_DIR, TINY

TENSORBOARD = RunIf("tensorboard", reason="pip install 'diffusion_lab[tensorboard]'")
MLFLOW = RunIf("mlflow", reason="pip install 'diffusion_lab[mlflow]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One tiny run with CSV, TensorBoard, wandb (offline) and MLflow (file store), less those not installed;
    wandb's run config and summary are read just before the run is finished (offline runs keep them only in a
    binary log)."""
    out = tmp_path_factory.mktemp("many")
    absent = [f"~logger.{name}" for name in ("tensorboard", "mlflow") if not installed(name)]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        overrides = [*TINY, "logger=many", *absent, f"paths.output_dir={out}"]
        cfg = compose("train", overrides, return_hydra_config=True)
    wandb_seen: dict = {}
    finish = train_module.finish_wandb

    def finish_and_record(exit_code: int = 0) -> None:
        import wandb

        if wandb.run is not None:
            wandb_seen["config"] = wandb.run.config.as_dict()
            wandb_seen["summary"] = {k: wandb.run.summary[k] for k in wandb.run.summary.keys()}
        finish(exit_code)

    env = dict(cfg.hydra.job.env_set)  # what Hydra sets for the job (MLflow's file store opt-in)
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    train_module.finish_wandb = finish_and_record
    try:
        del cfg.hydra
        summary = train(cfg)
    finally:
        train_module.finish_wandb = finish
        for k, v in old_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"out": out, "summary": summary, "wandb": wandb_seen}


def test_csv_log_stays_beside_the_other_loggers(run):
    with open(run["out"] / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2, 3]
    final = [r for r in rows if r.get("summary/final_train_loss")]
    assert len(final) == 1 and float(final[0]["summary/final_train_loss"]) == pytest.approx(
        run["summary"]["final_train_loss"]
    )


def test_wandb_gets_the_config_once_and_the_summary(run):
    config, summary = run["wandb"]["config"], run["wandb"]["summary"]
    assert config["model"]["objective"] == "flow" and config["tags"] == ["dev"]
    assert "objective" not in config and "cond_drop_prob" not in config  # no flat system hparams
    for key in ("final_train_loss", "class_accuracy", "steps"):
        assert summary[key] == pytest.approx(run["summary"][key]), key
    media = list((run["out"] / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))
    assert len(media) == 2  # the grids of steps 2 and 4


@TENSORBOARD
def test_tensorboard_has_scalars_grids_and_hparams_with_the_final_figures(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(
        str(run["out"] / "tensorboard"), size_guidance={"images": 0, "scalars": 0}
    ).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Images("samples")] == [2, 4]  # the sample grids
    assert acc.Scalars("summary/class_accuracy")[-1].value == pytest.approx(run["summary"]["class_accuracy"])
    plugin = acc.PluginTagToContent("hparams")
    assert set(plugin) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
    assert {"summary/class_accuracy", "summary/final_train_loss"} <= {
        m.name.tag for m in experiment.metric_infos
    }
    start = plugin_data_pb2.HParamsPluginData.FromString(
        plugin["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["model/objective"].string_value == "flow"


@MLFLOW
def test_mlflow_file_store_holds_params_metrics_grids_and_summary(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{run['out'] / 'mlruns'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "diffusion_lab"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    assert mlrun.data.params["model/objective"] == "flow"
    assert mlrun.data.tags["tags"] == "['dev']"
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")] == [0, 1, 2, 3]
    assert mlrun.data.metrics["summary/class_accuracy"] == pytest.approx(run["summary"]["class_accuracy"])
    grids = sorted(a.path for a in client.list_artifacts(mlrun.info.run_id, "samples"))
    assert grids == ["samples/step_000002.png", "samples/step_000004.png"]


def test_summary_json_is_what_the_loggers_got(run):
    saved = json.loads((Path(run["out"]) / "summary.json").read_text())
    assert saved["steps"] == 4 and 0.0 <= saved["class_accuracy"] <= 1.0
