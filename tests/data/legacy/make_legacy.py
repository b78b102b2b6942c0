"""Made ONCE, at commit 1b2858d (before the continuous-time core), the legacy checkpoints + their samples.
import sys, json, shutil
from pathlib import Path
sys.path.insert(0, "/work/main/tests")
import numpy as np, torch
from conftest import TINY, compose
from diffusion_lab.train import train
from diffusion_lab.sample import load_system
from diffusion_lab.diffusion import get_sampler, SAMPLERS

OUT = Path("/work/main/tests/data/legacy")
cases = {
    "eps_linear_cond": ["model.prediction_type=eps", "noise=linear"],
    "v_cosine_uncond": ["model.prediction_type=v", "noise=cosine", "model.net.num_classes=null",
                        "model.loss_weighting=uniform", "callbacks=diffusion"],
}
ref = {}
for name, extra in cases.items():
    run = Path(f"/tmp/legacy_{name}")
    shutil.rmtree(run, ignore_errors=True)
    ov = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.class_accuracy", "callbacks.image_logger"))] + ["trainer.max_steps=150", "model.optimizer.lr=5e-3", "callbacks.ema.update_starting_at_step=0", "callbacks.image_logger=null"] + extra
    if "callbacks=diffusion" not in extra:
        ov.append("callbacks.class_accuracy=null")
    cfg = compose("train", ov, run)
    train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    shutil.copy(ckpt, OUT / f"{name}.ckpt")
    model, _ = load_system(OUT / f"{name}.ckpt")
    for s in SAMPLERS:
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn((4, *model.sample_shape), generator=g)
        cond = {"class_labels": torch.tensor([0, 3, 5, 9])} if model.num_classes else {}
        img = model.sample(sampler=get_sampler(s, steps=5, clip_x0=True), x_T=x_T, cond=cond,
                           guidance_scale=3.0 if cond else 1.0, generator=g)
        ref[f"{name}/{s}"] = img.numpy()
        print(name, s, float(img.abs().mean()), float(img.std()))
np.savez_compressed(OUT / "reference_samples.npz", **ref)
