"""Bad input is answered with one clear line: config types, data folders, corrupt images, sampling arguments,
unwritable folders, and the CLI's `error: <cause>` with exit code 1 instead of a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import InstantiationException
from PIL import Image

from diffusion_lab.checkpoints import CheckpointError
from diffusion_lab.cli import exit_on_user_error, one_line
from diffusion_lab.config_types import ConfigError, check_config
from diffusion_lab.data.base import CorruptImageError, DatasetNotFoundError
from diffusion_lab.data.folder import ImageFolderDataModule
from diffusion_lab.sample import sample
from diffusion_lab.train import train

from conftest import CONF_DIR, TINY, compose

REPO = Path(__file__).resolve().parents[1]
QUICK = [*TINY, "trainer.max_steps=2", "callbacks.class_accuracy=null", "callbacks.image_logger=null"]


def _single_line(e: pytest.ExceptionInfo) -> str:
    text = one_line(e.value)
    assert "\n" not in text and len(text) < 1000
    return text


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=abc", r"trainer\.max_steps='abc' has the wrong type: Trainer expects int"),
        (
            "model.cond_drop_prob=high",
            r"model\.cond_drop_prob='high' has the wrong type: DiffusionSystem expects float",
        ),
        (
            "data.batch_size=[1,2]",
            r"data\.batch_size=\[1, 2\] has the wrong type: DigitsDataModule expects int",
        ),
        (
            "+model.net.num_head=3",
            r"model\.net\.num_head is not an argument of UNet \(did you mean num_heads\?\)",
        ),
        ("+trainer.max_step=3", r"trainer\.max_step is not an argument of Trainer \(did you mean max_steps"),
        (
            "trainer.precision=fp99",
            r"trainer\.precision='fp99' has the wrong type: Trainer expects .*bf16-mixed",
        ),
    ],
)
def test_wrong_config_values_are_named(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        train(compose("train", [*QUICK, override], tmp_path))
    _single_line(e)
    assert not (tmp_path / "checkpoints").exists()  # failed before building anything


def test_every_shipped_config_passes_the_type_check(tmp_path):
    from omegaconf import OmegaConf

    from experiment_fixtures import overrides_for

    for experiment in sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        (tmp_path / experiment).mkdir()
        fixtures = overrides_for(experiment, tmp_path / experiment)
        cfg = compose("train", [f"experiment={experiment}", *fixtures], tmp_path / experiment)
        check_config(OmegaConf.to_container(cfg, resolve=True))


def test_unknown_group_option_lists_the_choices(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"Available options in 'process':\s+cosine\s+linear"):
        compose("train", ["process=nope"], tmp_path)


# --------------------------------------------------------------------------------------------- data
def _folder(tmp_path: Path, *, n: int = 6, corrupt: bool = False) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"{i}.png")
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


FOLDER = [*QUICK, "data=image_folder", "data.image_size=8", "data.channels=1", "model.net.num_classes=null"]


def test_missing_and_empty_data_dirs_fail_through_train(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as e:
        train(compose("train", [*FOLDER, f"data.data_dir={tmp_path / 'nowhere'}"], tmp_path / "a"))
    assert str(tmp_path / "nowhere") in _single_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="the folder is empty") as e:
        train(compose("train", [*FOLDER, f"data.data_dir={tmp_path / 'empty'}"], tmp_path / "b"))
    _single_line(e)


def test_corrupt_image_is_named_by_the_data_module(tmp_path):
    dm = ImageFolderDataModule(
        data_dir=_folder(tmp_path, corrupt=True), image_size=8, channels=1, batch_size=2, val_fraction=0.0,
        test_fraction=0.0,
    )  # fmt: skip
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=r"corrupt or unreadable image file .*broken\.png") as e:
        for _ in dm.train_dataloader():
            pass
    _single_line(e)


def test_unwritable_run_dir(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"cannot write the run folder .*a_file/run: Not a directory") as e:
        train(compose("train", QUICK, tmp_path / "a_file" / "run"))
    _single_line(e)


# ----------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny class-conditional and unconditional checkpoints."""
    out = {}
    for name, extra in (("class", []), ("uncond", ["model.net.num_classes=null"])):
        run = tmp_path_factory.mktemp(name)
        train(compose("train", [*QUICK, *extra], run))
        out[name] = run / "checkpoints" / "last.ckpt"
    return out


def _sample_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("sample", ["n=2", "sampler.steps=2", *overrides])


@pytest.mark.parametrize(
    ("kind", "override", "expected"),
    [
        ("uncond", "prompt=a red square", "prompt given, but this model is not text-conditional"),
        ("uncond", "class_label=1", "class_label given, but this model is not class-conditional"),
        ("class", "class_label=10", "class_label=10 is out of range: this model has classes 0..9"),
        ("class", "class_label=-1", "class_label=-1 is out of range"),
        ("class", "sampler.steps=0", "steps must be an integer >= 1, got 0"),
        ("class", "guidance_scale=-1", "guidance_scale must be >= 0, got -1"),
        ("class", "n=0", "n must be >= 1, got 0"),
    ],
)
def test_bad_sampling_arguments(checkpoints, tmp_path, kind, override, expected):
    cfg = _sample_cfg([f"ckpt={checkpoints[kind]}", f"out={tmp_path / 's'}", override])
    with pytest.raises((ValueError, InstantiationException)) as e:
        sample(cfg)
    assert expected in _single_line(e)


def test_unwritable_sample_folder(checkpoints, tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = _sample_cfg([f"ckpt={checkpoints['class']}", f"out={tmp_path / 'a_file' / 'out'}"])
    with pytest.raises(ValueError, match=r"cannot write the output folder .*a_file/out") as e:
        sample(cfg)
    _single_line(e)


# -------------------------------------------------------------------------------------------- CLI
def _cli(module: str, *args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **env}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_1(tmp_path):
    env = {"PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": ""}
    r = _cli(
        "diffusion_lab.train",
        "trainer.max_steps=abc",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
        **env,
    )
    assert r.returncode == 1
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "trainer.max_steps='abc' has the wrong type: Trainer expects int" in errors[0]
    assert "Traceback" not in out

    r = _cli("diffusion_lab.sample", f"ckpt={tmp_path / 'missing.ckpt'}", tmp_path=tmp_path, **env)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert f"error: checkpoint not found: {tmp_path / 'missing.ckpt'}" in r.stdout + r.stderr


@pytest.mark.slow
def test_cli_unknown_group_option_lists_the_choices(tmp_path):
    r = _cli("diffusion_lab.train", "sampler=nope", tmp_path=tmp_path, PYTHONPATH=str(REPO))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "Could not find 'sampler/nope'" in r.stderr and "Available options in 'sampler'" in r.stderr


def test_exit_on_user_error(monkeypatch, caplog):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("DIFFUSION_LAB_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e, exit_on_user_error():
        raise CheckpointError("checkpoint not found: x.ckpt")
    assert e.value.code == 1 and caplog.messages[-1] == "error: checkpoint not found: x.ckpt"
    with pytest.raises(KeyError), exit_on_user_error():  # a bug is not a user error: full traceback
        raise KeyError("bug")
    monkeypatch.setenv("DIFFUSION_LAB_TRACEBACK", "1")  # the switch for the full traceback
    with pytest.raises(CheckpointError), exit_on_user_error():
        raise CheckpointError("checkpoint not found: x.ckpt")


# ------------------------------------------------------------------------ issue 15: each one line, nothing silent
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "data.image_size=7",
            r"data\.image_size=7 gives 7x7 inputs, which this UNet cannot halve 1 time.*multiple of 2",
        ),
        ("model.net.num_classes=5", r"model\.net\.num_classes=5 is smaller than the data's 10 classes"),
        ("data.val_fraction=1.0", r"data\.val_fraction=1\.0 must be a number in \[0, 1\)"),
        ("data.val_fraction=-0.1", r"data\.val_fraction=-0\.1 must be a number in \[0, 1\)"),
        ("data.test_fraction=0.95", r"leave nothing to train on"),
        ("auto_resume=maybe", r"auto_resume must be true or false, got 'maybe'"),
    ],
)
def test_model_data_and_run_mismatches_are_named(tmp_path, override, expected):
    with pytest.raises((ValueError, InstantiationException)) as e:
        train(compose("train", [*QUICK, override], tmp_path))
    assert re.search(expected, _single_line(e)), _single_line(e)
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny classifier and autoencoder runs: checkpoints of train.py that are not diffusion models."""
    from experiment_fixtures import TINY_SHAPES

    short = ["trainer.max_steps=1", "trainer.enable_progress_bar=false"]
    runs = {
        "classifier": ["experiment=digits_classifier", *short],
        "autoencoder": [
            "experiment=shapes_autoencoder",
            *TINY_SHAPES,
            *short,
            "model.net.base_channels=8",
            "model.scale_factor_batches=1",
        ],
    }
    out = {}
    for name, over in runs.items():
        run = tmp_path_factory.mktemp(name)
        train(compose("train", over, run))
        out[name] = run / "checkpoints" / "last.ckpt"
    return out


@pytest.mark.parametrize(
    ("kind", "system"), [("classifier", "ClassifierSystem"), ("autoencoder", "AutoencoderSystem")]
)
def test_sampling_a_checkpoint_that_is_not_a_diffusion_model(other_checkpoints, tmp_path, kind, system):
    cfg = _sample_cfg([f"ckpt={other_checkpoints[kind]}", f"out={tmp_path / 's'}"])
    with pytest.raises(
        CheckpointError, match=rf"is not a diffusion model checkpoint: it holds a {system} "
    ) as e:
        sample(cfg)
    _single_line(e)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("guidance_scale=abc", "guidance_scale must be a number, got 'abc'"),
        ("guidance_scale=nan", "guidance_scale must be a number, got nan"),
        ("class_label=abc", "class_label must be an integer, got 'abc'"),
        ("class_label=1.5", "class_label must be an integer, got 1.5"),
        ("class_label=true", "class_label must be an integer, got True"),
        ("n=abc", "n must be an integer, got 'abc'"),
        ("batch_size=0", "batch_size must be >= 1, got 0"),
        ("device=tpu9", "device='tpu9' is not a device"),
    ],
)
def test_bad_sampling_values(checkpoints, tmp_path, override, expected):
    cfg = _sample_cfg([f"ckpt={checkpoints['class']}", f"out={tmp_path / 's'}", override])
    with pytest.raises(ValueError) as e:
        sample(cfg)
    assert expected in _single_line(e)
    assert not (tmp_path / "s" / "grid.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(checkpoints, tmp_path):
    cfg = _sample_cfg([f"ckpt={checkpoints['class']}", f"out={tmp_path / 's'}", "device=cuda"])
    with pytest.raises(ValueError, match="device=cuda but CUDA is not available here: use device=cpu") as e:
        sample(cfg)
    _single_line(e)
    with pytest.raises((ValueError, InstantiationException)) as e:  # training: Lightning's message, one line
        train(compose("train", [*QUICK, "trainer.accelerator=cuda"], tmp_path / "run"))
    assert "CUDAAccelerator" in _single_line(e)


def test_a_class_label_given_as_3_0_is_class_3(checkpoints, tmp_path):
    info = sample(_sample_cfg([f"ckpt={checkpoints['class']}", f"out={tmp_path / 's'}", "class_label=3.0"]))
    assert (np.load(tmp_path / "s" / "samples.npz")["labels"] == 3).all() and info["n"] == 2


def test_disk_full_while_writing_samples(checkpoints, tmp_path, monkeypatch):
    import errno

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    cfg = _sample_cfg([f"ckpt={checkpoints['class']}", f"out={tmp_path / 's'}"])
    with pytest.raises(ValueError, match=r"disk full: cannot write the image .*grid\.png") as e:
        sample(cfg)
    _single_line(e)
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_a_checkpoint_with_changed_bytes_is_refused_by_sample(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad.ckpt"
    shutil.copy(checkpoints["class"], bad)
    shutil.copy(f"{checkpoints['class']}.sha256", f"{bad}.sha256")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad\.ckpt is corrupted") as e:
        sample(_sample_cfg([f"ckpt={bad}", f"out={tmp_path / 's'}"]))
    _single_line(e)


def test_a_prompt_longer_than_the_context_warns_how_many_tokens_were_dropped(caplog):
    from diffusion_lab.data.captions import caption_words
    from diffusion_lab.nets.text import TransformerTextEncoder, WordTokenizer
    from diffusion_lab.sample import warn_if_truncated

    encoder = TransformerTextEncoder(
        tokenizer=WordTokenizer(vocabulary=caption_words("shapes"), max_length=6), dim=8, depth=1, num_heads=2
    )
    assert warn_if_truncated(encoder, "a red square") == 0 and not caplog.records
    assert warn_if_truncated(encoder, "a big red square at the top left") == 4  # 8 words + BOS, EOS in 6
    assert (
        "has 10 tokens but the text encoder's context holds 6: the last 4 token(s) were dropped"
        in caplog.text
    )
    assert "(the model sees 'a big red square')" in caplog.text


def test_a_truncated_summary_given_to_report(tmp_path, caplog):
    from diffusion_lab.report import main as report_main

    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (run / "summary.json").write_text('{"steps": 700, "final_tr')
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path / "sweep")])
    assert e.value.code == 1
    errors = [m for m in caplog.messages if m.startswith("error:")]
    assert len(errors) == 1 and "summary.json is not valid JSON" in errors[0] and "\n" not in errors[0]


@pytest.mark.slow
def test_cli_unwritable_run_dir_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    r = _cli(
        "diffusion_lab.train",
        f"hydra.run.dir={tmp_path / 'a_file' / 'run'}",
        tmp_path=tmp_path,
        PYTHONPATH=str(REPO),
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out, out[-2000:]
    assert [ln for ln in out.splitlines() if ln.strip()] == [
        f"error: cannot write the run folder (hydra.run.dir) {tmp_path / 'a_file' / 'run'}: Not a directory"
    ]
