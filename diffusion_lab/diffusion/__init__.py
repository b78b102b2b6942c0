"""The diffusion maths: noise processes, objectives, noise-level distributions, loss weightings, grids,
guidance and samplers."""

from .grids import GRIDS, Grid, make_grid
from .guidance import Denoiser, classifier_free_guidance
from .losses import LOSS_WEIGHTINGS, diffusion_loss, get_loss_weighting
from .noise_levels import NOISE_LEVELS, get_noise_levels
from .objectives import Objective, get_objective, training_loss
from .parameterization import PREDICTION_TYPES, convert, from_x0_eps, to_x0_eps, training_target
from .processes import PROCESSES, Process
from .registry import Registry
from .samplers import SAMPLERS, Sampler, get_sampler, register_sampler, sampler_options
from .schedules import SCHEDULES, SPACINGS, NoiseSchedule, get_process, get_schedule, process_names

__all__ = [
    "GRIDS",
    "LOSS_WEIGHTINGS",
    "NOISE_LEVELS",
    "PREDICTION_TYPES",
    "PROCESSES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "Denoiser",
    "Grid",
    "NoiseSchedule",
    "Objective",
    "Process",
    "Registry",
    "Sampler",
    "classifier_free_guidance",
    "convert",
    "diffusion_loss",
    "from_x0_eps",
    "get_loss_weighting",
    "get_noise_levels",
    "get_objective",
    "get_process",
    "get_sampler",
    "get_schedule",
    "make_grid",
    "process_names",
    "register_sampler",
    "sampler_options",
    "to_x0_eps",
    "training_loss",
    "training_target",
]
