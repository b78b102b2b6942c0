"""Hydra config groups of diffusion_lab (a package, so Hydra finds them in an installed wheel: pkg://diffusion_lab.conf)."""
