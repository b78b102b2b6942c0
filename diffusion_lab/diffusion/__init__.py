"""The diffusion maths: noise processes, objectives, noise-level distributions, loss weightings, grids,
guidance and samplers."""

from . import (
    consistency,  # noqa: E402, F401  (registers the consistency objective, grid and sampler)
    meanflow,  # noqa: E402, F401  (registers the meanflow objective and sampler)
    shortcut,  # noqa: E402, F401  (registers the shortcut objective and sampler)
)
from .grids import GRIDS, Grid, make_grid
from .guidance import Denoiser, Guidance
from .losses import LOSS_WEIGHTINGS, diffusion_loss, get_loss_weighting
from .noise_levels import NOISE_LEVELS, get_noise_levels
from .objectives import (
    OBJECTIVES,
    LossInputs,
    Objective,
    convert,
    get_objective,
    register_objective,
    training_loss,
)
from .processes import PROCESSES, Process, get_process
from .registry import Registry
from .samplers import SAMPLERS, Sampler, get_sampler, register_sampler, sampler_options
from .schedules import BETA_SCHEDULES, DiscreteProcess

__all__ = [
    "BETA_SCHEDULES",
    "GRIDS",
    "LOSS_WEIGHTINGS",
    "NOISE_LEVELS",
    "OBJECTIVES",
    "PROCESSES",
    "SAMPLERS",
    "Denoiser",
    "DiscreteProcess",
    "Grid",
    "Guidance",
    "LossInputs",
    "Objective",
    "Process",
    "Registry",
    "Sampler",
    "convert",
    "diffusion_loss",
    "get_loss_weighting",
    "get_noise_levels",
    "get_objective",
    "get_process",
    "get_sampler",
    "make_grid",
    "register_objective",
    "register_sampler",
    "sampler_options",
    "training_loss",
]

RENAMED = {  # old public name -> what to use now (one name per concept)
    "PREDICTION_TYPES": "OBJECTIVES",
    "training_target": "get_objective(name).target",
    "from_x0_eps": "get_objective(name).target",
    "to_x0_eps": "get_objective(name).denoised",
    "SCHEDULES": "BETA_SCHEDULES (or PROCESSES)",
    "NoiseSchedule": "DiscreteProcess",
    "get_schedule": "get_process",
    "SPACINGS": "GRIDS",
    "process_names": "PROCESSES.names()",
    "classifier_free_guidance": "Denoiser(..., guidance=Guidance(scale=...))",
}


def __getattr__(name: str):
    if name in RENAMED:  # ImportError: what `from diffusion_lab.diffusion import <old>` shows as is
        raise ImportError(f"diffusion_lab.diffusion.{name} is gone: use {RENAMED[name]}")
    raise AttributeError(f"module 'diffusion_lab.diffusion' has no attribute {name!r}")
