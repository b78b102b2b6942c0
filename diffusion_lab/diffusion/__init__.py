"""The diffusion maths: noise schedules, parameterizations, loss weightings, guidance and samplers."""

from .guidance import classifier_free_guidance
from .losses import LOSS_WEIGHTINGS, diffusion_loss, get_loss_weighting
from .parameterization import PREDICTION_TYPES, convert, from_x0_eps, to_x0_eps, training_target
from .registry import Registry
from .samplers import SAMPLERS, Denoiser, Sampler, get_sampler, register_sampler, sampler_options
from .schedules import SCHEDULES, SPACINGS, NoiseSchedule, get_schedule

__all__ = [
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "Denoiser",
    "NoiseSchedule",
    "Registry",
    "Sampler",
    "classifier_free_guidance",
    "convert",
    "diffusion_loss",
    "from_x0_eps",
    "get_loss_weighting",
    "get_sampler",
    "get_schedule",
    "register_sampler",
    "sampler_options",
    "to_x0_eps",
    "training_target",
]
