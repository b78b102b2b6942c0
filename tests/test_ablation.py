"""Ablation experiments: every point of every sweep grid composes and builds; sweep grouping of wandb runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.instantiate import build_loggers, sweep_group, sweep_logger_kwargs

from conftest import CONF_DIR, TINY
from conftest import compose as compose_train

ABLATIONS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("ablation_*.yaml"))


def _grid(params) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for `hydra.sweeper.params` (the cartesian product)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    assert all(len(a) >= 2 for a in axes), axes  # every axis sweeps something
    return [list(p) for p in itertools.product(*axes)]


def test_there_are_ablations():
    assert {"ablation_objective", "ablation_cfg_dropout", "ablation_width"} <= set(ABLATIONS)


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_every_grid_point_composes_and_builds(experiment, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose("train", [f"experiment={experiment}"], return_hydra_config=True)
        assert experiment in base.hydra.sweep.dir  # multirun/<experiment>/<date>
        params = base.hydra.sweeper.params
        assert params, f"{experiment} sets no hydra.sweeper.params"
        for point in _grid(params):
            cfg = compose("train", [f"experiment={experiment}", *point, f"paths.output_dir={tmp_path}"])
            for override in point:
                key, value = override.split("=", 1)
                node = OmegaConf.select(cfg, key)
                got = node.name if key == "process" else node  # a group: the option's registered name
                assert str(got) == value, (override, got)
            model = instantiate(cfg.model, _convert_="all")  # bad values fail here (names, ranges, widths)
            assert model.objective.name == cfg.model.objective


def test_sweep_groups_wandb_runs(tmp_path):
    sweep = {
        "dir": str(tmp_path / "multirun" / "ablation_objective" / "2026-01-01_00-00-00"),
        "num": 3,
        "override_dirname": "experiment=ablation_objective,process=cosine",
        "overrides": ["experiment=ablation_objective", "process=cosine", "x" * 80],
    }
    cfg = compose_train("train", [*TINY, "logger=wandb", "experiment=ablation_objective"], tmp_path / "run")
    csv, logger = build_loggers(cfg, sweep=sweep)  # the CSV log stays beside wandb
    assert type(csv).__name__ == "CSVLogger"
    init = logger._wandb_init  # the wandb.init arguments (no run is started until logger.experiment)
    assert init["group"] == "ablation_objective/2026-01-01_00-00-00" == sweep_group(sweep["dir"])
    assert init["job_type"] == "ablation_objective"
    assert init["name"] == "3_experiment=ablation_objective,process=cosine"
    assert init["tags"] == [
        "dev",
        "experiment=ablation_objective",
        "process=cosine",
        "x" * 64,
    ]  # `tags` first
    assert "anonymous" not in init  # Lightning's None makes wandb warn
    # outside a sweep nothing changes; set values are kept
    assert build_loggers(cfg)[1]._wandb_init["group"] is None
    cfg.logger.wandb.group = "mine"
    cfg.logger.wandb.name = "named"
    kwargs = sweep_logger_kwargs(cfg.logger.wandb, sweep, task_name=cfg.task_name)
    assert "group" not in kwargs and "name" not in kwargs
    assert sweep_logger_kwargs(OmegaConf.create({"_target_": "x.CSVLogger"}), sweep, task_name="t") == {}
