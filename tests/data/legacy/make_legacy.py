"""How the legacy checkpoints and their samples were made: ONCE, at commit 1b2858d (before the continuous-time core).

Kept for the record (`tests/test_legacy.py` reads the files, and says which samples were redrawn since); running it
again would overwrite the reference.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from diffusion_lab.diffusion import SAMPLERS, Guidance, get_sampler  # noqa: E402
from diffusion_lab.sample import load_system  # noqa: E402
from diffusion_lab.train import train  # noqa: E402

from conftest import TINY, compose  # noqa: E402

OUT = Path(__file__).resolve().parent
CASES = {
    "eps_linear_cond": ["model.objective=eps", "process=linear"],
    "v_cosine_uncond": [
        "model.objective=v",
        "process=cosine",
        "model.net.num_classes=null",
        "model.loss_weighting=uniform",
        "callbacks=diffusion",
    ],
}
SKIP = ("trainer.max_steps", "callbacks.class_accuracy", "callbacks.image_logger")

ref = {}
for name, extra in CASES.items():
    run = Path(f"/tmp/legacy_{name}")
    shutil.rmtree(run, ignore_errors=True)
    ov = [o for o in TINY if not o.startswith(SKIP)] + [
        "trainer.max_steps=150",
        "model.optimizer.lr=5e-3",
        "callbacks.ema.update_starting_at_step=0",
        "callbacks.image_logger=null",
        *extra,
    ]
    if "callbacks=diffusion" not in extra:
        ov.append("callbacks.class_accuracy=null")
    train(compose("train", ov, run))
    shutil.copy(run / "checkpoints" / "last.ckpt", OUT / f"{name}.ckpt")
    model, _ = load_system(OUT / f"{name}.ckpt")
    for s in SAMPLERS:
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn((4, *model.sample_shape), generator=g)
        cond = {"class_labels": torch.tensor([0, 3, 5, 9])} if model.num_classes else {}
        img = model.sample(
            sampler=get_sampler(s, steps=5),
            x_T=x_T,
            cond=cond,
            guidance=Guidance(scale=3.0 if cond else 1.0),
            generator=g,
        )
        ref[f"{name}/{s}"] = img.numpy()
np.savez_compressed(OUT / "reference_samples.npz", **ref)
