"""Renamed config keys and Python names fail in one line naming the new one (no silent aliases)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from diffusion_lab.renamed import RENAMED_KEYS, renamed_override


@pytest.mark.parametrize(
    "override,new",
    [
        ("noise=cosine", "process"),
        ("+noise@foo=linear", "process"),
        ("model.prediction_type=v", "model.objective"),
        ("sampler.spacing=trailing", "sampler/grid"),
        ("+sampler.clip_x0=true", "model.clip_x0"),
    ],
)
def test_old_override_names_the_new(override, new):
    message = renamed_override(["seed=1", override])
    assert message.startswith(override.lstrip("+").split("=")[0].split("@")[0]) and new in message
    assert "\n" not in message


def test_new_names_pass():
    assert renamed_override(["process=cosine", "model.objective=v", "sampler/grid=trailing"]) is None
    assert set(RENAMED_KEYS) == {"noise", "model.prediction_type", "sampler.spacing", "sampler.clip_x0"}


def test_train_cli_refuses_an_old_key_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffusion_lab.train", "noise=cosine", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: noise was renamed: use process (in 'noise=cosine')"
    assert not any(tmp_path.iterdir())  # nothing was composed or run


@pytest.mark.parametrize(
    "module,name,new",
    [
        ("diffusion_lab.diffusion", "get_schedule", "get_process"),
        ("diffusion_lab.diffusion", "NoiseSchedule", "DiscreteProcess"),
        ("diffusion_lab.diffusion", "PREDICTION_TYPES", "OBJECTIVES"),
        ("diffusion_lab.diffusion", "classifier_free_guidance", "Denoiser"),
        ("diffusion_lab.diffusion.parameterization", "to_x0_eps", "get_objective"),
    ],
)
def test_old_python_names_fail_naming_the_new(module, name, new):
    with pytest.raises(ImportError, match=f"{name} is gone: use .*{new}"):
        exec(f"from {module} import {name}", {})
    importlib.import_module(module)  # the module itself still imports


def test_a_config_file_setting_an_old_key_fails_naming_the_new():
    from diffusion_lab.config_types import ConfigError, check_config

    config = {"model": {"prediction_type": "v"}, "noise": {"name": "cosine"}}
    with pytest.raises(ConfigError) as info:
        check_config(config)
    message = str(info.value)
    assert "model.prediction_type was renamed: use model.objective" in message
    assert "noise was renamed: use process" in message and "\n" not in message
