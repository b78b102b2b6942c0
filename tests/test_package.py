"""The installed package: a wheel (configs inside) in a fresh venv trains from outside the source tree through the
`dl-*` scripts, with Hydra's tab completion; the package data lists every config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "diffusion_lab" / "conf"


def _env() -> dict[str, str]:
    """This environment without PYTHONPATH (the source tree must not be importable) and with one thread."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def base_python() -> str:
    """The interpreter this one's venv (if any) was made from: `--system-site-packages` of a venv made from it
    sees the system's packages, whereas a venv made from inside a venv would see the bare system Python's."""
    return getattr(sys, "_base_executable", None) or sys.executable


def see_running_packages(venv: Path) -> None:
    """Make this interpreter's own site-packages (a virtualenv's: where `make setup` put torch, hydra, ...)
    visible in `venv`, after its own, through a `.pth` file; nothing to do for a system-wide install. Plain path
    lines: `.pth` files there (the editable install of the checkout) are not run, so the wheel's package wins."""
    if sys.prefix == sys.base_prefix:
        return
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_dir = _run([str(venv / "bin" / "python"), "-c", probe], cwd=venv).strip().splitlines()[-1]
    Path(site_dir, "running_interpreter.pth").write_text("".join(f"{p}\n" for p in ours))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the package sources (the checkout stays free of build/ and egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "diffusion_lab", src / "diffusion_lab", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheel")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        cwd=src,
    )
    [whl] = out.glob("diffusion_lab-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"diffusion_lab/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    configs -= {c for c in configs if c.startswith("diffusion_lab/conf/local/")}  # personal, git-ignored
    assert configs and configs <= names, sorted(configs - names)
    assert "diffusion_lab/conf/train.yaml" in names and "diffusion_lab/conf/debug/default.yaml" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("dl-train = diffusion_lab.train:main", "dl-sample = diffusion_lab.sample:main"):
        assert script in scripts


@pytest.mark.slow
def test_fresh_venv_trains_from_outside_the_source_tree(wheel, tmp_path):
    # a fresh venv that reuses this interpreter's packages for torch & co. (no download); the package itself
    # comes only from the wheel, not from the (editable) install of the checkout
    venv = tmp_path / "venv"
    _run([base_python(), "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    see_running_packages(venv)
    bin_dir = venv / "bin"
    _run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--ignore-installed",
            str(wheel),
        ],
        cwd=tmp_path,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(
        [str(bin_dir / "python"), "-c", "import diffusion_lab; print(diffusion_lab.__file__)"], cwd=work
    )
    assert Path(where.strip()).is_relative_to(venv), where

    cheap = ["callbacks.class_accuracy.num_per_class=1", "callbacks.image_logger.num_samples=10"]
    _run([str(bin_dir / "dl-train"), "trainer.max_steps=5", "hydra.run.dir=run", *cheap], cwd=work)
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 5 and (work / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (work / "run" / "config_tree.log").read_text().count("DiffusionSystem") == 1

    # Hydra's bash completion of the installed script lists the options of a config group
    env = {**_env(), "COMP_LINE": "dl-train debug=", "COMP_POINT": "15"}
    choices = _run([str(bin_dir / "dl-train"), "-sc", "query=bash"], cwd=work, env=env).split()
    assert {"debug=default", "debug=overfit", "debug=limit"} <= set(choices), choices

    _run([str(bin_dir / "dl-report"), "run"], cwd=work)
    assert "| run |" in (work / "run" / "report.md").read_text()
