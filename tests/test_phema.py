"""Post-hoc EMA (Karras et al. 2024): the profile maths against closed forms, the tracking callback against the
power EMA of the recorded weights, reconstruction of a tracked profile, the CLI, resume and evaluate's axis."""

from __future__ import annotations

import csv
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from diffusion_lab.callbacks.phema import PostHocEMA, list_snapshots
from diffusion_lab.phema import reconstruct
from diffusion_lab.power_ema import (
    SIGMA_REL_MAX,
    posthoc_coefficients,
    power_ema_beta,
    profile_inner_products,
    sigma_rel_to_gamma,
)

from conftest import CONF_DIR, TINY, compose


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> np.ndarray:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) of the profile with exponent gamma (Eq. 123)."""
    g = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def closed_form_ema(theta: np.ndarray, gamma: float, t: int) -> np.ndarray:
    """The power-function EMA at step t of weights theta[s - 1] after step s, integrated exactly over (s - 1, s]:
    weight of step s = (s^(gamma + 1) - (s - 1)^(gamma + 1)) / t^(gamma + 1)."""
    s = np.arange(1, t + 1, dtype=np.float64)
    w = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / t ** (gamma + 1)
    return w @ theta[:t]


def track(theta: np.ndarray, sigma_rel: float, every: int) -> dict[int, np.ndarray]:
    """What the callback does, in numpy: beta_t = (1 - 1/t)^(gamma + 1) after each step, a snapshot every `every`."""
    gamma = float(sigma_rel_to_gamma(sigma_rel))
    ema, snaps = np.zeros(theta.shape[1]), {}
    for t in range(1, len(theta) + 1):
        beta = power_ema_beta(gamma, t)
        ema = beta * ema + (1 - beta) * theta[t - 1]
        if t % every == 0:
            snaps[t] = ema.copy()
    return snaps


def synthetic_weights(steps: int, seed: int = 0) -> np.ndarray:
    """A few 'weights' drifting like a training run's: smooth trends plus per-step noise."""
    s = np.arange(1, steps + 1) / steps
    rng = np.random.default_rng(seed)
    smooth = np.stack([s**2, np.sin(3 * s), np.exp(-3 * s), s * np.cos(7 * s), 1 - np.sqrt(s)], axis=1)
    return smooth + 0.05 * rng.standard_normal(smooth.shape)


def test_sigma_rel_and_gamma_are_inverse_with_the_papers_values():
    # the paper's two tracked profiles: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    np.testing.assert_allclose(sigma_rel_to_gamma([0.05, 0.10]), [16.9722, 6.9372], atol=1e-4)
    gammas = np.array([0.01, 1.0, 6.94, 16.97, 100.0])
    np.testing.assert_allclose(sigma_rel_to_gamma(gamma_to_sigma_rel(gammas)), gammas, rtol=1e-9)
    # sigma_rel is the standard deviation of the profile (relative to t): check by quadrature
    gamma, tau = 6.94, np.linspace(0, 1, 200_001)
    p = (gamma + 1) * tau**gamma
    mean = np.trapezoid(tau * p, tau)
    np.testing.assert_allclose(np.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau)), gamma_to_sigma_rel(gamma))
    assert gamma_to_sigma_rel(0.0) == pytest.approx(SIGMA_REL_MAX)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(0.3)


def test_profile_inner_products_by_quadrature():
    tau = np.linspace(0, 1000, 400_001)

    def profile(t, g):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    for (ta, ga), (tb, gb) in [
        ((1000, 6.94), (600, 16.97)),
        ((300, 2.0), (800, 6.94)),
        ((500, 3.0), (500, 3.0)),
    ]:
        expected = np.trapezoid(profile(ta, ga) * profile(tb, gb), tau)
        np.testing.assert_allclose(profile_inner_products(ta, ga, tb, gb), expected, rtol=1e-4)


def test_tracking_is_the_closed_form_power_ema():
    theta = synthetic_weights(300)
    for sigma_rel in (0.05, 0.10):
        snaps = track(theta, sigma_rel, every=100)
        gamma = float(sigma_rel_to_gamma(sigma_rel))
        for t, ema in snaps.items():
            np.testing.assert_allclose(ema, closed_form_ema(theta, gamma, t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_sigma_rel", [0.03, 0.07, 0.15])
def test_reconstruction_of_a_synthetic_sequence_matches_its_closed_form_ema(out_sigma_rel):
    """Snapshots of the 0.05 and 0.10 EMAs every 25 of 1000 steps; any length in between or around, at the last
    step and at an earlier snapshot, against the exact power EMA of the sequence (weights of size ~1)."""
    theta = synthetic_weights(1000)
    tracked = {s: track(theta, s, every=25) for s in (0.05, 0.10)}
    inputs = [(t, s) for s in tracked for t in tracked[s]]
    gamma = float(sigma_rel_to_gamma(out_sigma_rel))
    for out_step in (1000, 600):
        used = [(t, s) for t, s in inputs if t <= out_step]
        coef = posthoc_coefficients([t for t, _ in used], [s for _, s in used], out_step, [out_sigma_rel])
        got = sum(c * tracked[s][t] for c, (t, s) in zip(coef[:, 0], used, strict=True))
        expected = closed_form_ema(theta, gamma, out_step)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
        naive = tracked[0.05 if out_sigma_rel < 0.075 else 0.10][out_step]  # the nearest tracked profile
        assert np.abs(got - expected).max() < 0.1 * np.abs(naive - expected).max()
    # constant weights come out unchanged: the coefficients sum to one
    assert coef.sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- the callback
class RecordRaw(Callback):
    """The raw trained weights after every optimizer step."""

    def __init__(self) -> None:
        self.raw: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        params = PostHocEMA.averaged_parameters(pl_module)
        self.raw[trainer.global_step] = {n: p.detach().clone() for n, p in params.items()}


def test_callback_tracks_the_power_ema_of_the_raw_weights(tmp_path):
    from diffusion_lab.data.digits import DigitsDataModule
    from diffusion_lab.diffusion import get_process
    from diffusion_lab.nets.dit import DiT
    from diffusion_lab.systems.diffusion import DiffusionSystem

    torch.manual_seed(0)
    system = DiffusionSystem(
        net=DiT(in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=10),
        process=get_process("linear"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        image_size=8,
    )
    phema, raw = PostHocEMA(sigma_rels=[0.05, 0.10], every_n_steps=4, dirpath=str(tmp_path)), RecordRaw()
    trainer = L.Trainer(
        max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[phema, raw], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(system, datamodule=DigitsDataModule(image_size=8, batch_size=8))
    snaps = list_snapshots(tmp_path)
    assert [(s.step, s.sigma_rel) for s in snaps] == [(t, s) for t in (4, 8, 10) for s in (0.05, 0.10)]
    for snap in snaps:
        weights = torch.load(snap.path, weights_only=True)["weights"]
        assert set(weights) == set(raw.raw[1]) and all(k.startswith("net.") for k in weights)
        gamma = float(sigma_rel_to_gamma(snap.sigma_rel))
        for name, value in weights.items():
            seq = np.stack([raw.raw[t][name].reshape(-1).double().numpy() for t in range(1, snap.step + 1)])
            expected = closed_form_ema(seq, gamma, snap.step).reshape(value.shape)
            np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    moved = {n: (raw.raw[10][n] - raw.raw[1][n]).abs().max() for n in raw.raw[1]}
    assert sum(float(v) > 1e-3 for v in moved.values()) > len(moved) // 2  # the weights really moved


PHEMA = [
    *TINY,
    "trainer.max_steps=24",
    "callbacks=[default,phema]",
    "callbacks.phema.sigma_rels=[0.05,0.08,0.10]",
    "callbacks.phema.every_n_steps=2",
    "callbacks.checkpoint.every_n_train_steps=8",
    "callbacks.checkpoint.save_top_k=-1",
    "callbacks.class_accuracy=null",
    "callbacks.image_logger.every_n_steps=100",
]


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    from diffusion_lab.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("phema") / "run"
    train(compose("train", PHEMA, run))
    torch.set_num_threads(threads)
    return run


def test_reconstructing_a_tracked_profile_matches_it(phema_run, tmp_path):
    """0.08 was tracked during training; rebuilt from the 0.05 and 0.10 snapshots alone it comes out close to
    the tracked weights: 100x closer than either neighbour is (measured: 1.3e-5 against 8e-3 and 1e-2)."""
    ckpt_dir = phema_run / "checkpoints"
    (path,) = reconstruct(ckpt_dir, [0.08], in_sigma_rels=[0.05, 0.10], out_dir=tmp_path)
    got = torch.load(path, weights_only=False)
    tracked = {
        s: torch.load(ckpt_dir / "phema" / f"snapshot-0000024-{s:.3f}.pt")["weights"]
        for s in (0.05, 0.08, 0.1)
    }
    names = list(tracked[0.08])

    def dist(a: dict, b: dict) -> float:
        return float(torch.cat([(a[n] - b[n].float()).reshape(-1) for n in names]).norm())

    error = dist(got["state_dict"], tracked[0.08])
    assert error < 0.01 * min(dist(tracked[0.05], tracked[0.08]), dist(tracked[0.10], tracked[0.08]))
    assert got["phema"]["step"] == 24 and len(got["phema"]["inputs"]) == 2 * 12


def test_cli_writes_checkpoints_that_sample_and_the_rest_comes_from_the_template(phema_run, tmp_path):
    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.diffusion import get_sampler

    ckpt_dir = phema_run / "checkpoints"
    cmd = [
        sys.executable,
        "-m",
        "diffusion_lab.phema",
        f"ckpt_dir={ckpt_dir}",
        "sigma_rel=[0.03,0.2]",
        f"out={tmp_path}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    paths = [tmp_path / "phema-0000024-0.030.ckpt", tmp_path / "phema-0000024-0.200.ckpt"]
    assert done.stdout.split("\n")[-3:] == [str(p) for p in paths] + [""]  # after the log lines
    assert all(p.is_file() and p.with_name(p.name + ".sha256").is_file() for p in paths)
    template = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    short, long = (torch.load(p, weights_only=False) for p in paths)
    assert (
        "optimizer_states" not in short
        and "callbacks" not in short
        and short["diffusion_lab"] == template["diffusion_lab"]
    )
    name = "net.conv_in.weight"
    assert not torch.allclose(short["state_dict"][name], long["state_dict"][name])
    # a short EMA is nearer the raw weights at the end than a long one
    raw = template["current_model_state"][name]
    assert (short["state_dict"][name] - raw).norm() < (long["state_dict"][name] - raw).norm()
    model, _ = load_system(paths[0])
    x = model.sample(
        sampler=get_sampler("ddim", steps=2), num_samples=2, cond={"class_labels": torch.tensor([1, 2])}
    )
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        reconstruct(ckpt_dir, [0.5])
    with pytest.raises(ValueError, match="no snapshot at step 7: the snapshots are at steps"):
        reconstruct(ckpt_dir, [0.1], step=7)
    with pytest.raises(
        ValueError, match="no post-hoc EMA snapshots .* train with callbacks=\\[default,phema\\]"
    ):
        reconstruct(tmp_path, [0.1])


def test_a_resumed_run_continues_the_same_averages(phema_run, tmp_path):
    from diffusion_lab.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path / "resumed"
    train(compose("train", [*PHEMA, f"ckpt_path={phema_run / 'checkpoints' / 'step000008.ckpt'}"], run))
    torch.set_num_threads(threads)
    resumed = {(s.step, s.sigma_rel): s.path for s in list_snapshots(run / "checkpoints" / "phema")}
    assert min(resumed)[0] == 10 and max(resumed)[0] == 24
    for key, path in resumed.items():
        ref = torch.load(phema_run / "checkpoints" / "phema" / path.name)["weights"]
        for name, value in torch.load(path)["weights"].items():
            torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


def test_evaluate_sweeps_sigma_rel(phema_run, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from diffusion_lab.evaluate import evaluate

    ckpt = phema_run / "checkpoints" / "last.ckpt"
    over = [f"ckpt={ckpt}", "sigma_rels=[0.05,0.15]", "samplers=[ddim]", "steps=[2]", "guidance_scales=[2.0]",
            "num_samples=8", "features=[random]", "metrics=[fid]", f"cache_dir={tmp_path / 'cache'}",
            f"out={tmp_path / 'eval'}", "progress=false"]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="evaluate", overrides=over)
    evaluate(cfg)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics_vs_sigma_rel.csv")))
    assert [(r["sigma_rel"], r["sampler"]) for r in rows] == [
        ("", "real_val"),
        ("0.05", "ddim"),
        ("0.15", "ddim"),
    ]
    assert rows[1]["fid_random"] != rows[2]["fid_random"]  # other weights, other samples
    assert (tmp_path / "eval" / "sigma_rel_0.050" / "metrics.csv").is_file()
    assert (tmp_path / "eval" / "metrics_vs_sigma_rel.png").is_file()
    made = ckpt.parent / "phema-0000024-0.150.ckpt"
    mtime = made.stat().st_mtime_ns
    evaluate(cfg)  # the reconstructions (and samples) are reused
    assert made.stat().st_mtime_ns == mtime
