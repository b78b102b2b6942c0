"""Moved: prediction types are the objectives of ``diffusion_lab.diffusion.objectives`` (one registered class each)."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"parameterization.{name} is gone: use diffusion_lab.diffusion.objectives (get_objective)"
    )
