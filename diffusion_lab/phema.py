"""Post-hoc EMA (Karras et al. 2024): power-function EMA profiles, their least-squares reconstruction, and the CLI.

`python -m diffusion_lab.phema ckpt_dir=<run>/checkpoints sigma_rel=[0.05,0.1,0.15]` reads the snapshots that
`callbacks.phema.PostHocEMA` wrote during training (`<ckpt_dir>/phema/snapshot-<step>-<sigma_rel>.pt`) and writes,
per `sigma_rel`, the EMA of that relative length at the last snapshot's step as an ordinary checkpoint
(`<ckpt_dir>/phema-<step>-<sigma_rel>.ckpt`: `sample` and `evaluate` take it).

The maths (the paper's Appendix C, in its names): a power-function EMA of exponent gamma averages the weights
theta(tau), 0 <= tau <= t, with the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1); its relative
standard deviation sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) says its length as a share of the
training time. Tracked step by step with beta_t = (1 - 1 / t)^(gamma + 1), it averages the weights theta_s after
step s with the profile integrated over (s - 1, s] exactly. Snapshots of such EMAs at several times and lengths
span profiles; the EMA of any other length is the combination of snapshots whose profile is closest in L2 to
the wanted one (least squares on the profiles' closed-form inner products), applied to the snapshots' weights.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_lab.callbacks.checkpoint import atomic_save
from diffusion_lab.checkpoints import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

SIGMA_REL_MAX = math.sqrt(1 / 12)  # gamma = 0: the plain average of all weights so far
SNAPSHOT_DIR = "phema"
_SNAPSHOT = re.compile(r"snapshot-(\d+)-(\d+\.\d+)\.pt")
_TRAINING_STATE = (  # what a reconstructed checkpoint leaves out: it is for sampling, not for resuming
    "optimizer_states",
    "lr_schedulers",
    "callbacks",
    "loops",
    "current_model_state",
    "averaging_state",
)


# ------------------------------------------------------------------------------------------------ the maths
def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> np.ndarray:
    """The exponent gamma of the power-function profile with relative standard deviation sigma_rel: the largest
    real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) (Eq. 126, Algorithm 2)."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    if not np.all((s > 0) & (s < SIGMA_REL_MAX)):
        raise ValueError(
            f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (the plain average), got {sigma_rel}"
        )
    gamma = [np.roots([1.0, 7.0, 16.0 - v**-2, 12.0 - v**-2]).real.max() for v in s.reshape(-1)]
    return np.asarray(gamma, dtype=np.float64).reshape(s.shape)


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> np.ndarray:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) of the profile with exponent gamma (Eq. 123)."""
    g = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def power_ema_beta(gamma: float, step: int) -> float:
    """beta_t = (1 - 1 / t)^(gamma + 1): the decay after optimizer step t >= 1 that tracks the power-function
    profile (Eq. 127 with one step per unit of time); 0 at t = 1, where the EMA starts as a copy."""
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(
    t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray
) -> np.ndarray:
    """<p_a, p_b> = integral of p_{t_a, gamma_a}(tau) p_{t_b, gamma_b}(tau) d tau over [0, min(t_a, t_b)]
    = (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_max) (t_min / t_max)^(gamma of the longer one)
    (Eq. 151, Algorithm 3), broadcast over the arguments."""
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    gamma_a, gamma_b = np.asarray(gamma_a, dtype=np.float64), np.asarray(gamma_b, dtype=np.float64)
    t_max, t_min = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    gamma_long = np.where(t_a < t_b, gamma_b, gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max)
    return scale * (t_min / t_max) ** gamma_long


def posthoc_coefficients(
    in_steps: Sequence[int],
    in_sigma_rels: Sequence[float],
    out_step: int,
    out_sigma_rels: Sequence[float],
) -> np.ndarray:
    """(inputs, outputs) weights x minimising || sum_i x_i p_i - p_out ||_2 for every output profile: the
    solution of the Gram system A x = b of the inputs' profiles (Algorithm 3), each column then scaled to sum
    to 1 so that weights that never changed are reproduced exactly."""
    in_t = np.asarray(in_steps, dtype=np.float64)
    in_g = sigma_rel_to_gamma(np.asarray(in_sigma_rels, dtype=np.float64))
    out_g = sigma_rel_to_gamma(np.asarray(out_sigma_rels, dtype=np.float64))
    gram = profile_inner_products(in_t[:, None], in_g[:, None], in_t[None, :], in_g[None, :])  # (I, I)
    b = profile_inner_products(in_t[:, None], in_g[:, None], float(out_step), out_g[None, :])  # (I, O)
    x = np.linalg.solve(gram, b)
    return x / x.sum(axis=0, keepdims=True)


# ------------------------------------------------------------------------------------------------ snapshots
@dataclass(frozen=True)
class Snapshot:
    """One snapshot file of a tracked power-function EMA: its path, optimizer step and sigma_rel."""

    path: Path
    step: int
    sigma_rel: float


def snapshot_path(directory: str | Path, step: int, sigma_rel: float) -> Path:
    return Path(directory) / f"snapshot-{step:07d}-{sigma_rel:.3f}.pt"


def output_name(step: int, sigma_rel: float) -> str:
    """The file name of a reconstructed checkpoint."""
    return f"phema-{step:07d}-{sigma_rel:.3f}.ckpt"


def list_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots in `directory`, by step then sigma_rel."""
    found = []
    for p in Path(directory).glob("snapshot-*.pt"):
        if m := _SNAPSHOT.fullmatch(p.name):
            found.append(Snapshot(p, int(m.group(1)), float(m.group(2))))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def load_snapshot(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The averaged weights of a snapshot file (state_dict names), checked against its checksum."""
    data = read_checkpoint(snapshot.path, what="post-hoc EMA snapshot")
    if not isinstance(data.get("weights"), dict):
        raise CheckpointError(f"{snapshot.path} is not a post-hoc EMA snapshot (no 'weights')")
    return data["weights"]


def select_snapshots(
    directory: str | Path, *, step: int | None = None, in_sigma_rels: Sequence[float] | None = None
) -> tuple[list[Snapshot], int]:
    """(snapshots to combine, the step to reconstruct at): those at or before `step` (default: the last snapshot
    step, which `step` must also be), optionally only the tracked lengths `in_sigma_rels`."""
    snaps = list_snapshots(directory)
    if in_sigma_rels is not None:
        wanted = {round(float(s), 3) for s in in_sigma_rels}
        snaps = [s for s in snaps if round(s.sigma_rel, 3) in wanted]
    if not snaps:
        raise ValueError(
            f"no post-hoc EMA snapshots in {directory}"
            + (f" with sigma_rel in {list(in_sigma_rels)}" if in_sigma_rels is not None else "")
            + ": train with callbacks=[default,phema] (diffusion_lab.callbacks.phema.PostHocEMA)"
        )
    steps = sorted({s.step for s in snaps})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"no snapshot at step {step}: the snapshots are at steps {steps}")
    return [s for s in snaps if s.step <= step], step


# ------------------------------------------------------------------------------------------------ reconstruction
def reconstruct_weights(
    snapshots: Sequence[Snapshot], step: int, sigma_rels: Sequence[float]
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """The EMA weights of each `sigma_rels` at `step` (float64 sums of the snapshots, one file in memory at a
    time) and the (snapshots, outputs) coefficients used."""
    coef = posthoc_coefficients(
        [s.step for s in snapshots], [s.sigma_rel for s in snapshots], step, sigma_rels
    )
    out: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    names: set[str] | None = None
    for i, snap in enumerate(snapshots):
        weights = load_snapshot(snap)
        if names is None:
            names = set(weights)
        elif set(weights) != names:
            raise CheckpointError(f"{snap.path} holds other weights than the snapshots before it")
        for j, acc in enumerate(out):
            for name, w in weights.items():
                term = w.to(torch.float64) * float(coef[i, j])
                acc[name] = term if name not in acc else acc[name] + term
    return out, coef


def checkpoint_with_weights(
    template: dict[str, Any], weights: dict[str, torch.Tensor], info: dict[str, Any]
) -> dict[str, Any]:
    """A sampling checkpoint: the template's config and other blocks, its `state_dict` with `weights` in place
    (cast to the template's dtypes), no training state, and `info` under "phema"."""
    state = dict(template["state_dict"])
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise CheckpointError(
            f"the snapshots hold weights the template checkpoint lacks: {', '.join(unknown[:5])}"
        )
    for name, w in weights.items():
        state[name] = w.to(state[name].dtype)
    out = {k: v for k, v in template.items() if k not in _TRAINING_STATE}
    out.update(state_dict=state, global_step=int(info["step"]), phema=info)
    return out


def reconstruct(
    ckpt_dir: str | Path,
    sigma_rels: Sequence[float],
    *,
    step: int | None = None,
    in_sigma_rels: Sequence[float] | None = None,
    template: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> list[Path]:
    """Write one checkpoint per `sigma_rels` (`<out_dir>/phema-<step>-<sigma_rel>.ckpt`, default out_dir =
    ckpt_dir) holding the post-hoc EMA of that length, reconstructed from `<ckpt_dir>/phema/` snapshots; the
    config and the weights that are not averaged (frozen parts, buffers) come from `template` (default
    `<ckpt_dir>/last.ckpt`). Returns the paths."""
    ckpt_dir = Path(ckpt_dir)
    sigma_rels = [float(s) for s in sigma_rels]
    sigma_rel_to_gamma(np.asarray(sigma_rels))  # range check before any file is read
    snapshots, step = select_snapshots(ckpt_dir / SNAPSHOT_DIR, step=step, in_sigma_rels=in_sigma_rels)
    template = Path(template) if template is not None else ckpt_dir / "last.ckpt"
    base = read_checkpoint(template)
    weights, coef = reconstruct_weights(snapshots, step, sigma_rels)
    out_dir = Path(out_dir) if out_dir is not None else ckpt_dir
    paths = []
    for j, (sigma_rel, w) in enumerate(zip(sigma_rels, weights, strict=True)):
        info = {
            "sigma_rel": sigma_rel,
            "gamma": float(sigma_rel_to_gamma(sigma_rel)),
            "step": step,
            "template": str(template),
            "inputs": [
                {"file": s.path.name, "coefficient": float(coef[i, j])} for i, s in enumerate(snapshots)
            ],
        }
        path = out_dir / output_name(step, sigma_rel)
        atomic_save(checkpoint_with_weights(base, w, info), path, checksum=True)
        log.info(
            "post-hoc EMA sigma_rel=%.3f at step %d from %d snapshots -> %s",
            sigma_rel,
            step,
            len(snapshots),
            path,
        )
        paths.append(path)
    return paths


def posthoc_checkpoints(ckpt: str | Path, sigma_rels: Sequence[float]) -> list[Path]:
    """For `evaluate`'s sigma_rel axis: the post-hoc EMA checkpoints of `ckpt`'s run at each sigma_rel (snapshots
    in `phema/` beside it, `ckpt` the template) at the last snapshot step, where the CLI writes them; a file
    there made from the same snapshots and template is reused."""
    ckpt = Path(ckpt)
    snapshots, step = select_snapshots(ckpt.parent / SNAPSHOT_DIR)
    inputs = [s.path.name for s in snapshots]
    todo, paths = [], []
    for sigma_rel in (float(s) for s in sigma_rels):
        path = ckpt.parent / output_name(step, sigma_rel)
        paths.append(path)
        if not _made_from(path, inputs, ckpt):
            todo.append(sigma_rel)
    if todo:
        reconstruct(ckpt.parent, todo, step=step, template=ckpt)
    return paths


def _made_from(path: Path, inputs: list[str], template: Path) -> bool:
    """Whether a reconstructed checkpoint exists that was made from these snapshot files and this template."""
    if not path.is_file():
        return False
    try:
        info = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("phema") or {}
    except Exception:
        return False
    return [i["file"] for i in info.get("inputs", [])] == inputs and info.get("template") == str(template)


# ------------------------------------------------------------------------------------------------ CLI
def run(cfg) -> list[Path]:
    """The CLI's work on a composed `conf/phema.yaml`."""
    from diffusion_lab.sample import number
    from diffusion_lab.validation import ensure_writable_dir, file_argument

    def numbers(value: Any, key: str) -> list[float]:
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        return [number(v, f"{key}={value!r}: each") for v in values]

    sigma_rels = numbers(cfg.sigma_rel, "sigma_rel")
    if not sigma_rels:
        raise ValueError("sigma_rel must be a non-empty list, e.g. sigma_rel=[0.05,0.1]")
    try:
        sigma_rel_to_gamma(np.asarray(sigma_rels))
    except ValueError as e:
        raise ValueError(f"sigma_rel={cfg.sigma_rel!r}: {e}") from None
    ckpt_dir = Path(file_argument(cfg.ckpt_dir, "ckpt_dir"))
    if not ckpt_dir.is_dir():
        raise ValueError(
            f"ckpt_dir {ckpt_dir} is not a folder: give a run's checkpoints folder (<run>/checkpoints)"
        )
    step = None if cfg.step is None else number(cfg.step, "step", integer=True, minimum=1)
    in_sigma_rels = None if cfg.in_sigma_rel is None else numbers(cfg.in_sigma_rel, "in_sigma_rel")
    if cfg.out is not None:
        ensure_writable_dir(file_argument(cfg.out, "out"), "output folder (out)")
    template = None if cfg.template is None else file_argument(cfg.template, "template")
    return reconstruct(
        ckpt_dir, sigma_rels, step=step, in_sigma_rels=in_sigma_rels, template=template, out_dir=cfg.out
    )


def main() -> None:
    import hydra
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    from diffusion_lab.console import quiet
    from diffusion_lab.validation import exit_on_user_error

    @hydra.main(version_base="1.3", config_path="conf", config_name="phema")
    def _main(cfg) -> None:
        quiet()
        with exit_on_user_error((InstantiationException, OmegaConfBaseException)):
            for path in run(cfg):
                print(path)

    _main()


if __name__ == "__main__":
    main()
