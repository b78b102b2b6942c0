"""Safe checkpoints: weights-only reading everywhere (a pickle that would run code is refused by every entry point,
in one line), every checkpoint the framework writes loads weights-only, and the safetensors export round-trips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from diffusion_lab.checkpoints import (
    UnsafeCheckpointError,
    load_system,
    read_checkpoint,
    trusted_checkpoints,
)
from diffusion_lab.diffusion import get_sampler
from diffusion_lab.export import export, time_loading
from diffusion_lab.generate import generate_all
from diffusion_lab.phema import reconstruct
from diffusion_lab.train import train

from conftest import CONF_DIR, TINY, compose
from experiment_fixtures import TINY_SHAPES, overrides_for

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy"
QUICK = [*TINY, "callbacks.class_accuracy=null", "callbacks.image_logger=null"]
SHORT = ["trainer.max_steps=2", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]


class RunsCode:
    """Unpickling this runs code: it writes `marker` (what a malicious checkpoint would do, harmlessly here)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def trojan(path: Path, marker: Path, *, like: Path) -> Path:
    """A real checkpoint (`like`) with one extra entry whose unpickling writes `marker`."""
    ckpt = torch.load(like, map_location="cpu", weights_only=True)
    ckpt["payload"] = RunsCode(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


class _Signal(Callback):
    """SIGTERM to this process as the batch of `at_step` starts: the preemption save writes last.ckpt."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs of every system the framework trains: {name: run folder}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("safe")
    phema = [
        "callbacks=[default,phema]",
        "callbacks.phema.sigma_rels=[0.05,0.10]",
        "callbacks.phema.every_n_steps=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.save_top_k=-1",
    ]
    configs = {
        "diffusion": [*QUICK, *phema],
        "classifier": ["experiment=digits_classifier", *SHORT, "model.net.base_channels=4"],
        "autoencoder": [
            "experiment=shapes_autoencoder",
            *TINY_SHAPES,
            *SHORT,
            "model.net.base_channels=8",
            "model.scale_factor_batches=1",
        ],
        "contrastive": ["experiment=shapes_contrastive", *overrides_for("shapes_contrastive", root), *SHORT],
        "latent": [
            "experiment=shapes_ldm_text",
            *overrides_for("shapes_ldm_text", root / "fixtures"),
            *SHORT,
        ],
    }
    out = {}
    for name, overrides in configs.items():
        train(compose("train", overrides, root / name))
        out[name] = root / name
    with pytest.raises(SystemExit):  # preempted at step 3: GracefulStop writes last.ckpt
        train(compose("train", QUICK, root / "preempted"), extra_callbacks=[_Signal(at_step=2)])
    out["preempted"] = root / "preempted"
    out["phema"] = root / "phema_out"
    reconstruct(root / "diffusion" / "checkpoints", [0.07], out_dir=out["phema"])
    torch.set_num_threads(threads)
    return out


def _images(model, n: int = 4) -> torch.Tensor:
    """What `sample` draws: the one generation loop, a fixed seed."""
    draw = {}
    if model.is_text_conditional:
        draw = {"prompts": ["a small red circle", "a big blue square"] * (n // 2)}
    elif model.num_classes:
        draw = {"labels": torch.arange(n) % model.num_classes}
    return generate_all(
        model, sampler=get_sampler("ddim", steps=3), num_samples=n, seed=3, guidance_scale=2.0, **draw
    )


# ------------------------------------------------------------------------------------ weights-only everywhere
def test_every_checkpoint_the_framework_writes_is_plain_tensors_and_values(runs):
    """No file needs a global beyond torch's weights-only defaults (nothing registered to make that so), and the
    weights-only read holds exactly what full unpickling gives."""
    registered = {getattr(g, "__module__", "") for g in torch.serialization.get_safe_globals()}
    assert all(m.startswith("torch.") for m in registered), registered  # torch's own: no allow-list of ours
    files = {
        "periodic": runs["diffusion"] / "checkpoints" / "step000002.ckpt",
        "last": runs["diffusion"] / "checkpoints" / "last.ckpt",
        "preemption": runs["preempted"] / "checkpoints" / "last.ckpt",
        "phema snapshot": next((runs["diffusion"] / "checkpoints" / "phema").glob("snapshot-*.pt")),
        "phema reconstruction": next(runs["phema"].glob("phema-*.ckpt")),
        **{
            kind: runs[kind] / "checkpoints" / "last.ckpt"
            for kind in ("classifier", "autoencoder", "contrastive")
        },
        "latent": runs["latent"] / "checkpoints" / "last.ckpt",
        **{f"legacy {p.stem}": p for p in LEGACY.glob("*.ckpt")},
    }
    assert (
        torch.load(files["preemption"], weights_only=True)["global_step"] == 3
    )  # really the preemption save
    for kind, path in files.items():
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], kind
        safe = read_checkpoint(path)
        full = torch.load(path, map_location="cpu", weights_only=False)
        assert sorted(safe) == sorted(full), kind
        _assert_same(safe, full, kind)


def _assert_same(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


def test_a_pickle_that_runs_code_is_refused_naming_what_it_wanted(runs, tmp_path, caplog):
    marker = tmp_path / "marker"
    bad = trojan(tmp_path / "bad.ckpt", marker, like=runs["diffusion"] / "checkpoints" / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_system(bad)
    message = str(e.value)
    assert "\n" not in message and "'exec'" in message and "trust_checkpoint=true" in message, message
    assert not marker.exists()
    # the refusal is what kept it from running: trusted, the same file runs its code (and is logged)
    with trusted_checkpoints(True):
        read_checkpoint(bad)
    assert marker.read_text() == "ran"
    assert "loading " + str(bad) + " with full unpickling" in caplog.text
    with pytest.raises(UnsafeCheckpointError):  # the trust ended with its block
        read_checkpoint(bad)


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DIFFUSION_LAB_TRACEBACK", None)
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _entry_points(runs: dict[str, Path], bad: Path, tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """Every way a checkpoint path reaches the framework: {name: (module, arguments)}."""
    good = runs["diffusion"] / "checkpoints" / "last.ckpt"
    resume_dir = tmp / "resume_run"
    trojan(resume_dir / "checkpoints" / "last.ckpt", tmp / "marker", like=good)
    phema_dir = tmp / "phema_ckpts"
    shutil.copytree(runs["diffusion"] / "checkpoints" / "phema", phema_dir / "phema")
    shutil.copy(bad, phema_dir / "last.ckpt")
    train_args = [*QUICK, "trainer.max_steps=2"]
    return {
        "train ckpt_path": (
            "diffusion_lab.train",
            [*train_args, f"ckpt_path={bad}", f"hydra.run.dir={tmp / 'r1'}"],
        ),
        "train auto_resume": (
            "diffusion_lab.train",
            [*train_args, "auto_resume=true", f"hydra.run.dir={resume_dir}"],
        ),
        "sample": ("diffusion_lab.sample", [f"ckpt={bad}", "n=2", f"out={tmp / 's'}"]),
        "sample guide_ckpt": (
            "diffusion_lab.sample",
            [f"ckpt={good}", f"guide_ckpt={bad}", "n=2", f"out={tmp / 's'}"],
        ),
        "evaluate": ("diffusion_lab.evaluate", [f"ckpt={bad}", "features=[random]", f"out={tmp / 'e'}"]),
        "evaluate classifier_ckpt": (
            "diffusion_lab.evaluate",
            [f"ckpt={good}", f"classifier_ckpt={bad}", f"out={tmp / 'e'}"],
        ),
        "phema": ("diffusion_lab.phema", [f"ckpt_dir={phema_dir}", "sigma_rel=[0.07]"]),
        "export": ("diffusion_lab.export", [f"ckpt={bad}", f"out={tmp / 'x.safetensors'}"]),
        "train autoencoder_ckpt": (
            "diffusion_lab.train",
            [
                "experiment=shapes_ldm_text",
                *overrides_for("shapes_ldm_text", tmp / "fx"),
                f"autoencoder_ckpt={bad}",
                f"hydra.run.dir={tmp / 'r2'}",
            ],
        ),
        "train text encoder init_ckpt": (
            "diffusion_lab.train",
            [
                "experiment=shapes_contrastive",
                *overrides_for("shapes_contrastive", tmp),
                f"model.text_encoder.init_ckpt={bad}",
                f"hydra.run.dir={tmp / 'r3'}",
            ],
        ),
    }


ENTRY_POINTS = [
    "train ckpt_path",
    "train auto_resume",
    "sample",
    "sample guide_ckpt",
    "evaluate",
    "evaluate classifier_ckpt",
    "phema",
    "export",
    "train autoencoder_ckpt",
    "train text encoder init_ckpt",
]


@pytest.mark.slow
def test_every_entry_point_refuses_a_pickle_that_runs_code_in_one_line(runs, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    marker = tmp_path / "marker"
    bad = trojan(tmp_path / "bad.ckpt", marker, like=runs["diffusion"] / "checkpoints" / "last.ckpt")
    points = _entry_points(runs, bad, tmp_path)
    assert sorted(points) == sorted(ENTRY_POINTS)
    with ThreadPoolExecutor(max_workers=4) as pool:  # ten CLI starts, four at a time
        done = dict(
            zip(points, pool.map(lambda e: _cli(e[0], *e[1], cwd=tmp_path), points.values()), strict=True)
        )
    for entry, r in done.items():
        out = r.stdout + r.stderr
        errors = [line for line in out.splitlines() if "error:" in line]
        assert r.returncode == 1, f"{entry}: {out[-3000:]}"
        assert len(errors) == 1 and "Traceback" not in out, f"{entry}: {out[-3000:]}"
        assert "refusing to load" in errors[0] and "'exec'" in errors[0], f"{entry}: {errors[0]}"
        assert "trust_checkpoint=true" in errors[0], f"{entry}: {errors[0]}"
    assert not marker.exists()


@pytest.mark.slow
def test_trust_checkpoint_is_the_way_past_and_it_is_logged(runs, tmp_path):
    marker = tmp_path / "marker"
    bad = trojan(tmp_path / "bad.ckpt", marker, like=runs["diffusion"] / "checkpoints" / "last.ckpt")
    r = _cli(
        "diffusion_lab.sample",
        f"ckpt={bad}",
        "n=2",
        f"out={tmp_path / 's'}",
        "trust_checkpoint=true",
        cwd=tmp_path,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert marker.read_text() == "ran"  # the file's code ran: what the default refusal prevents
    assert f"trust_checkpoint=true: loading {bad} with full unpickling" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------ safetensors export
@pytest.mark.parametrize("kind", ["diffusion", "latent"])
def test_export_samples_the_same_images_and_is_smaller(runs, tmp_path, kind):
    ckpt = runs[kind] / "checkpoints" / "last.ckpt"
    out = export(ckpt, tmp_path / "model.safetensors")
    assert out.stat().st_size < ckpt.stat().st_size / 2  # no optimizer, no raw weights
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:  # a plain safetensors file: tensors + JSON metadata
        assert all(name.startswith(("state_dict/", "autoencoder/")) for name in f.keys())  # noqa: SIM118
    torch.set_num_threads(1)
    (a, config_a), (b, config_b) = load_system(ckpt), load_system(out)
    assert config_a == config_b
    assert torch.equal(_images(a), _images(b))


def test_sample_and_evaluate_take_the_export_as_ckpt(runs, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from diffusion_lab.evaluate import evaluate
    from diffusion_lab.sample import sample

    torch.set_num_threads(1)
    ckpt = runs["diffusion"] / "checkpoints" / "last.ckpt"
    exported = export(ckpt, tmp_path / "model.safetensors")
    classifier = runs["classifier"] / "checkpoints" / "last.ckpt"
    classifier_export = export(classifier, tmp_path / "classifier.safetensors")
    results = {}
    for name, (model, judge) in {"ckpt": (ckpt, classifier), "export": (exported, classifier_export)}.items():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(
                "sample", [f"ckpt={model}", "n=4", "sampler.steps=2", f"out={tmp_path / name}"]
            )
            ev = hydra_compose(
                "evaluate",
                [
                    f"ckpt={model}",
                    f"classifier_ckpt={judge}",
                    "samplers=[ddim]",
                    "steps=[2]",
                    "num_samples=8",
                    "features=[classifier]",
                    "metrics=[fid,class_accuracy]",
                    "reference_split=null",
                    f"cache_dir={tmp_path / 'cache'}",
                    f"out={tmp_path / name / 'eval'}",
                    "progress=false",
                ],
            )
        sample(cfg)
        rows = evaluate(ev)
        results[name] = (np.load(tmp_path / name / "samples.npz")["images"], rows)
    np.testing.assert_array_equal(results["ckpt"][0], results["export"][0])
    a, b = ([{k: v for k, v in row.items() if "seconds" not in k} for row in results[n][1]] for n in results)
    assert a == b and np.isfinite(a[0]["fid_classifier"]) and "class_accuracy" in a[0]


def test_phema_writes_its_reconstruction_straight_to_an_export(runs, tmp_path):
    ckpt_dir = runs["diffusion"] / "checkpoints"
    (as_ckpt,) = reconstruct(ckpt_dir, [0.07], out_dir=tmp_path)
    (as_export,) = reconstruct(ckpt_dir, [0.07], out_dir=tmp_path / "phema.safetensors")
    a, b = read_checkpoint(as_ckpt), read_checkpoint(as_export)
    assert a["phema"] == b["phema"] and a["diffusion_lab"] == b["diffusion_lab"]
    assert sorted(a["state_dict"]) == sorted(b["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    with pytest.raises(ValueError, match="is one file: give one sigma_rel"):
        reconstruct(ckpt_dir, [0.05, 0.07], out_dir=tmp_path / "two.safetensors")


@pytest.mark.parametrize("name", ["eps_linear_cond", "v_cosine_uncond"])
def test_a_legacy_checkpoint_exported_samples_the_same_images(tmp_path, name):
    """tests/test_legacy.py: the .ckpt draws its stored reference images; its export draws exactly the same."""
    torch.set_num_threads(1)
    out = export(LEGACY / f"{name}.ckpt", tmp_path / "legacy.safetensors")
    (a, config_a), (b, config_b) = load_system(LEGACY / f"{name}.ckpt"), load_system(out)
    assert config_a == config_b and "schedule" in config_b["model"]  # the old config, converted at read time
    images = _images(a)
    assert images.abs().mean() > 0.1 and torch.equal(images, _images(b))


def test_load_time_benchmark_reports_both_files(runs):
    result = time_loading(runs["diffusion"] / "checkpoints" / "last.ckpt", repeats=2)
    assert result["safetensors"]["mb"] < result["ckpt"]["mb"]
    assert all(
        result[name][t] > 0
        for name in ("ckpt", "safetensors")
        for t in ("read_checkpoint_s", "deserialize_s")
    )


def test_an_export_is_for_sampling_not_for_resuming(runs, tmp_path):
    from diffusion_lab.checkpoints import CheckpointError

    exported = export(runs["diffusion"] / "checkpoints" / "last.ckpt", tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match="holds no training state .* resume from a checkpoint the run wrote"
    ):
        train(compose("train", [*QUICK, "trainer.max_steps=8", f"ckpt_path={exported}"], tmp_path / "run"))
