"""The peer race: our recipe vs torchcfm's and diffusers' own training loops, one thread each, one wall budget.

`python -m diffusion_lab.bench race budget=15m [key=value ...]` starts one process per contender at the same time
(OMP_NUM_THREADS=1, torch.set_num_threads(1)), each trains for the wall budget and samples its own way at `nfe`
network evaluations per image, then the framework's judge (a `experiment=fashion_mnist_classifier` checkpoint:
`judge_ckpt=`) scores `num_samples` class-balanced samples of each: class accuracy and FID on the judge's
features, with 95% bootstrap intervals (metrics.intervals). Writes into `out` (default outputs/race/<time>): race.md (the table),
race.json (every figure, per-class accuracies, the commands), grids/<contender>.png and grids/side_by_side.png.

Contenders (`contenders=[ours,torchcfm,diffusers]`):
- ours: `python -m diffusion_lab.train experiment=fashion_mnist ++trainer.max_time=<budget> trainer.max_steps=-1`
  plus every key=value that is not a race key below (so `python -m diffusion_lab.bench race model.optimizer.lr=3e-3`
  asks "is my change better than the peers at this budget?"); sampled with the run's sampler, unguided at `nfe`
  steps' worth of evaluations and guided (`guidance`, two evaluations per step) at the same NFE.
  `candidate="k=v k=v"` adds a run of our recipe with those overrides on top (contender `candidate`);
  `candidate.NAME="k=v ..."` adds one named NAME (several at once: a lever sweep at one budget).
- torchcfm: `examples/images/conditional_mnist.ipynb` of atong01/conditional-flow-matching as it ships: UNetModel
  (32 channels, 1 res block, class_cond), Adam (torch defaults: 1e-3), batch 128, ConditionalFlowMatcher(sigma=0),
  no EMA; sampled by fixed-step Euler from t=0 (noise) to 1 (the notebook integrates the same ODE with dopri5;
  fixed steps make the NFE the race's), no guidance. Our 32 px Fashion-MNIST instead of 28 px MNIST.
- diffusers: `examples/unconditional_image_generation/train_unconditional.py`'s loop with its defaults: DDPMScheduler
  (1000 steps, linear betas, epsilon), AdamW (1e-4, betas 0.95/0.999, weight decay 1e-6), cosine LR after 500
  warm-up steps (its horizon planned from the measured step time, as the budget ends training), EMAModel (warm-up
  inv_gamma 1, power 3/4, max 0.9999), gradient clipping 1.0, batch 16; class-conditional by
  UNet2DModel(num_class_embeds=10) sized like our net (32/64/64 channels, attention at 8x8, 1 layer per block:
  the script's 128-512 channel net does not train on one CPU thread); sampled by DDIM with `nfe` steps, no
  guidance (the script has no label dropout).

Race keys: budget (15m, 90s, 1h, seconds, or DD:HH:MM:SS), out, judge_ckpt, rescore (a finished race folder:
judge its samples again, e.g. with another judge_ckpt), num_samples (per contender, rounded
to whole classes), nfe, guidance, seed, contenders, candidate[.NAME], bootstrap (resamples), torchcfm.<key>=,
diffusers.<key>= (the peers' settings below: batch_size, lr, ...). Peers need `pip install -e .[bench]`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RACE_KEYS = {
    "budget",
    "out",
    "judge_ckpt",
    "num_samples",
    "nfe",
    "guidance",
    "seed",
    "contenders",
    "candidate",
    "bootstrap",
    "sample_batch",
    "data_dir",
    "rescore",
}
PEERS = ("torchcfm", "diffusers")
TORCHCFM_DEFAULTS: dict[str, Any] = {"batch_size": 128, "lr": 1e-3, "num_channels": 32, "num_res_blocks": 1}
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "batch_size": 16,
    "lr": 1e-4,
    "warmup_steps": 500,
    "adam_beta1": 0.95,
    "adam_beta2": 0.999,
    "weight_decay": 1e-6,
    "adam_epsilon": 1e-8,
    "ema_max_decay": 0.9999,
    "ema_inv_gamma": 1.0,
    "ema_power": 0.75,
    "beta_schedule": "linear",
    "train_timesteps": 1000,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 32,
}
DEFAULTS: dict[str, Any] = {
    "budget": "15m",
    "out": None,
    "judge_ckpt": None,
    "num_samples": 1000,
    "nfe": 20,
    "guidance": 3.0,
    "seed": 0,
    "contenders": ["ours", "torchcfm", "diffusers"],
    "candidate": None,
    "candidates": {},
    "bootstrap": 1000,
    "sample_batch": 250,
    "data_dir": None,
    "rescore": None,
}
JUDGE_HINT = (
    "the race needs a judge: judge_ckpt=<run>/checkpoints/last.ckpt of "
    "`python -m diffusion_lab.train experiment=fashion_mnist_classifier` (15 min on 2 idle cores, over an hour on one loaded thread)"
)


# ------------------------------------------------------------------------------------------------ settings
def parse_budget(text: str | float) -> float:
    """Seconds of `15m`, `90s`, `1h`, `600` or `DD:HH:MM:SS`; ValueError (one line) otherwise."""
    s = str(text).strip()
    if re.fullmatch(r"\d+(:\d+){3}", s):
        d, h, m, sec = (int(p) for p in s.split(":"))
        return float(((d * 24 + h) * 60 + m) * 60 + sec)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", s)
    if not m:
        raise ValueError(f"budget={text!r}: use e.g. 15m, 90s, 1h, 600 or 00:00:15:00")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def max_time(seconds: float) -> str:
    """Lightning's DD:HH:MM:SS of a whole number of seconds (at least 1)."""
    s = max(1, int(round(seconds)))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text.startswith("[") and text.endswith("]"):
            return [v.strip() for v in text[1:-1].split(",") if v.strip()]
        return text


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str], dict[str, dict[str, Any]]]:
    """Race settings, our recipe's overrides (every other key=value) and the peers' settings."""
    settings = {**DEFAULTS, "candidates": {}}
    peers: dict[str, dict[str, Any]] = {
        "torchcfm": dict(TORCHCFM_DEFAULTS),
        "diffusers": dict(DIFFUSERS_DEFAULTS),
    }
    ours: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        head, dot, sub = key.partition(".")
        if eq and key in RACE_KEYS:
            settings[key] = _value(value)
        elif eq and head == "candidate" and dot:
            settings["candidates"][sub] = value
        elif eq and dot and head in peers:
            if sub not in peers[head]:
                raise ValueError(f"{key}: {head} has no setting {sub!r} (known: {', '.join(peers[head])})")
            peers[head][sub] = _value(value)
        else:
            ours.append(arg)
    settings["budget_s"] = parse_budget(settings["budget"])
    if isinstance(settings["contenders"], str):
        settings["contenders"] = [settings["contenders"]]
    unknown = set(settings["contenders"]) - {"ours", *PEERS}
    if unknown:
        raise ValueError(f"contenders: unknown {sorted(unknown)} (ours, torchcfm, diffusers)")
    if settings["candidate"]:
        settings["candidates"] = {"candidate": settings["candidate"], **settings["candidates"]}
    clash = set(settings["candidates"]) & {"ours", "real", *PEERS}
    if clash:
        raise ValueError(f"candidate names {sorted(clash)} are taken: name candidates otherwise")
    settings["contenders"] = [*settings["contenders"], *settings["candidates"]]
    return settings, ours, peers


# ------------------------------------------------------------------------------------------------ workers
def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def _loader(data_dir: str | None, batch_size: int, seed: int):
    """Shuffled, drop_last batches of our 32 px Fashion-MNIST train split (images in [-1, 1]) forever."""
    import torch

    from diffusion_lab.data.mnist import FashionMNISTDataModule

    dm = FashionMNISTDataModule(data_dir=data_dir, image_size=32, batch_size=batch_size)
    dm.setup("fit")  # before the clock starts, as our train's data setup comes before Lightning's max_time
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            loader = torch.utils.data.DataLoader(
                dm.train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=g
            )
            for batch in loader:
                yield batch["image"], batch["label"]

    return batches()


def _balanced(n: int) -> np.ndarray:
    return np.arange(n) % 10


def _to_uint8(x) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


class Clock:
    """Wall seconds since the training loop started; the process's CPU seconds so far."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @staticmethod
    def cpu() -> float:
        return time.process_time()


def train_torchcfm(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """The notebook's loop (Adam, ConditionalFlowMatcher(sigma=0), MSE to the conditional flow) for the budget."""
    import torch
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.unet import UNetModel

    p = spec["peer"]
    torch.manual_seed(spec["seed"])
    model = UNetModel(
        dim=(1, 32, 32),
        num_channels=p["num_channels"],
        num_res_blocks=p["num_res_blocks"],
        num_classes=10,
        class_cond=True,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=p["lr"])
    fm = ConditionalFlowMatcher(sigma=0.0)
    data = _loader(spec["data_dir"], p["batch_size"], spec["seed"])
    clock, steps, images = Clock(), 0, 0
    loss = torch.tensor(float("nan"))
    while clock.elapsed() < spec["budget_s"]:
        x1, y = next(data)
        optimizer.zero_grad()
        x0 = torch.randn_like(x1)
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        vt = model(t, xt, y)
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()
        steps, images = steps + 1, images + len(x1)
    info = _train_info(clock, steps, images, float(loss), params=model)
    model.eval()
    n, nfe = spec["num_samples"], spec["nfe"]
    labels = _balanced(n)

    @torch.no_grad()
    def draw(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(len(y), 1, 32, 32, generator=g)
        dt = 1.0 / nfe
        for i in range(nfe):  # torchdiffeq's fixed-grid euler from t=0 to t=1
            t = torch.full((len(y),), i * dt)
            x = x + dt * model(t, x, y)
        return x

    samples = _draw_all(draw, labels, spec)
    return {
        "rows": {"torchcfm": _sample_row(samples, labels, nfe=nfe, how=f"Euler {nfe}, no guidance")},
        **info,
    }


def train_diffusers(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """train_unconditional.py's loop (DDPM eps, AdamW, cosine LR with warm-up, EMAModel, clipping) for the budget."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    p = spec["peer"]
    torch.manual_seed(spec["seed"])
    model = _diffusers_unet(p)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=int(p["train_timesteps"]),
        beta_schedule=p["beta_schedule"],
        prediction_type="epsilon",
    )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=float(p["lr"]),
        betas=(float(p["adam_beta1"]), float(p["adam_beta2"])),
        weight_decay=float(p["weight_decay"]),
        eps=float(p["adam_epsilon"]),
    )
    ema = EMAModel(
        model.parameters(),
        decay=float(p["ema_max_decay"]),
        use_ema_warmup=True,
        inv_gamma=float(p["ema_inv_gamma"]),
        power=float(p["ema_power"]),
    )
    data = _loader(spec["data_dir"], int(p["batch_size"]), spec["seed"])
    clock, steps, images = Clock(), 0, 0
    lr_scheduler = None  # planned after 20 steps: the script's horizon is its epochs, here the budget's steps
    loss = torch.tensor(float("nan"))
    while clock.elapsed() < spec["budget_s"]:
        clean, y = next(data)
        if lr_scheduler is None and (steps == 20 or spec["budget_s"] - clock.elapsed() < 1):
            planned = max(steps + 1, int(spec["budget_s"] / max(clock.elapsed(), 1e-3) * max(steps, 1)))
            lr_scheduler = get_cosine_schedule_with_warmup(
                optimizer, num_warmup_steps=int(p["warmup_steps"]), num_training_steps=planned, last_epoch=-1
            )
            for _ in range(steps):
                lr_scheduler.step()
        noise = torch.randn(clean.shape)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),)).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        noise_pred = model(noisy, timesteps, class_labels=y).sample
        loss = F.mse_loss(noise_pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if lr_scheduler is None:  # the first 20 steps: warm-up from 0 as the script's scheduler has it
            for group in optimizer.param_groups:
                group["lr"] = float(p["lr"]) * steps / max(1, int(p["warmup_steps"]))
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        ema.step(model.parameters())
        optimizer.zero_grad(set_to_none=True)
        steps, images = steps + 1, images + len(clean)
    info = _train_info(clock, steps, images, float(loss), params=model)
    ema.copy_to(model.parameters())
    return {"rows": {"diffusers": _sample_diffusers(model, noise_scheduler, spec)}, **info}


def _diffusers_unet(p: dict[str, Any]):
    """The class-conditional UNet2DModel of the diffusers contender, sized by the peer settings `p`."""
    from diffusers import UNet2DModel

    ch = [int(c) for c in p["block_out_channels"]]
    return UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        layers_per_block=int(p["layers_per_block"]),
        block_out_channels=ch,
        down_block_types=["DownBlock2D"] * (len(ch) - 1) + ["AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * (len(ch) - 1),
        num_class_embeds=10,
        norm_num_groups=int(p["norm_num_groups"]),
    )


def _sample_diffusers(model, noise_scheduler, spec: dict[str, Any]) -> dict[str, Any]:
    """DDIM at `spec["nfe"]` steps on the (EMA) model, no guidance: the diffusers contender's row."""
    import torch
    from diffusers import DDIMScheduler

    model.eval()
    n, nfe = spec["num_samples"], spec["nfe"]
    labels = _balanced(n)
    ddim = DDIMScheduler.from_config(noise_scheduler.config)

    @torch.no_grad()
    def draw(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        ddim.set_timesteps(nfe)
        x = torch.randn(len(y), 1, 32, 32, generator=g)
        for t in ddim.timesteps:
            eps = model(x, t, class_labels=y).sample
            x = ddim.step(eps, t, x).prev_sample
        return x

    samples = _draw_all(draw, labels, spec)
    return _sample_row(samples, labels, nfe=nfe, how=f"DDIM {nfe} (EMA weights), no guidance")


def train_ours(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Our train entry point for the budget (a child process), then its checkpoint sampled unguided and guided."""
    import torch

    from diffusion_lab.checkpoints import load_system
    from diffusion_lab.diffusion import get_sampler
    from diffusion_lab.generate import generate_all

    run_dir = out / "run"
    cmd = [
        sys.executable,
        "-m",
        "diffusion_lab.train",
        "experiment=fashion_mnist",
        f"++trainer.max_time={max_time(spec['budget_s'])}",
        "trainer.max_steps=-1",
        f"hydra.run.dir={run_dir}",
        f"seed={spec['seed']}",
        *(["data.data_dir=" + spec["data_dir"]] if spec["data_dir"] else []),
        *spec["overrides"],
    ]
    start = time.monotonic()
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"our training exited {code}: see {out / 'train.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads(json.dumps(_run_config(run_dir)))
    steps = int(summary["steps"])
    batch = int(config["data"]["batch_size"])
    info = {
        "command": shlex.join(cmd[1:]).replace(str(run_dir), "<run>"),
        "steps": steps,
        "images_seen": steps * batch,
        "train_wall_s": round(time.monotonic() - start, 1),
        "train_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "params": None,
        "final_loss": summary.get("final_train_loss"),
    }
    model, _ = load_system(run_dir / "checkpoints" / "last.ckpt", device="cpu")
    info["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad) or None
    sampler_cfg = dict(config.get("sampler") or {"name": "flow_euler"})
    name = sampler_cfg.get("name", "flow_euler")
    extra = {k: v for k, v in sampler_cfg.items() if k not in ("_target_", "name", "steps", "grid")}
    n, nfe = spec["num_samples"], spec["nfe"]
    labels = _balanced(n)
    rows = {}
    for key, g, per_step in (("", 1.0, 1), ("guided", float(spec["guidance"]), 2)):
        steps_k = _steps_for(name, nfe // per_step, extra)
        sampler = get_sampler(name, steps=steps_k, **extra)

        def draw(y: torch.Tensor, gen: torch.Generator, sampler=sampler, g=g) -> torch.Tensor:
            return generate_all(
                model,
                sampler=sampler,
                num_samples=len(y),
                seed=int(gen.initial_seed()),
                batch_size=len(y),
                guidance_scale=g,
                labels=y,
            )

        samples = _draw_all(draw, labels, spec)
        how = f"{name} {steps_k}" + (f", guidance {g:g}" if g != 1.0 else ", no guidance")
        rows[spec["name"] + ("_" + key if key else "")] = _sample_row(
            samples, labels, nfe=sampler.nfe * per_step, how=how
        )
    return {"rows": rows, **info}


def _run_config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)


def _steps_for(name: str, nfe: int, extra: dict[str, Any]) -> int:
    """The most steps of sampler `name` whose NFE is at most `nfe` (at least 1)."""
    from diffusion_lab.diffusion import get_sampler

    steps = max(1, nfe)
    while steps > 1 and get_sampler(name, steps=steps, **extra).nfe > nfe:
        steps -= 1
    return steps


def _train_info(clock: Clock, steps: int, images: int, loss: float, *, params) -> dict[str, Any]:
    return {
        "steps": steps,
        "images_seen": images,
        "train_wall_s": round(clock.elapsed(), 1),
        "train_cpu_s": round(Clock.cpu(), 1),
        "params": sum(p.numel() for p in params.parameters()),
        "final_loss": loss,
    }


def _draw_all(draw, labels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """uint8 (N, H, W, C) samples of `labels`, chunk by chunk, each chunk seeded from the race seed."""
    import torch

    out = []
    bs = int(spec["sample_batch"])
    for j, lo in enumerate(range(0, len(labels), bs)):
        g = torch.Generator().manual_seed(spec["seed"] * 1000 + j)
        y = torch.from_numpy(labels[lo : lo + bs]).long()
        out.append(_to_uint8(draw(y, g)))
    return np.concatenate(out)


def _sample_row(samples: np.ndarray, labels: np.ndarray, *, nfe: int, how: str) -> dict[str, Any]:
    return {"samples": samples, "labels": labels, "nfe": int(nfe), "sampling": how}


WORKERS = {
    "ours": train_ours,
    "torchcfm": train_torchcfm,
    "diffusers": train_diffusers,
}


def worker_main(spec_path: str) -> None:
    """One contender's process: train for the budget, sample, write samples.npz and train.json beside the spec."""
    _threads()
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec_path).parent
    start = time.monotonic()
    result = WORKERS.get(spec["name"], train_ours)(spec, out)
    rows = result.pop("rows")
    result["sample_wall_s"] = round(time.monotonic() - start - result["train_wall_s"], 1)
    arrays = {}
    for row_name, row in rows.items():
        arrays[f"{row_name}__images"] = row.pop("samples")
        arrays[f"{row_name}__labels"] = row.pop("labels")
    result["rows"] = rows
    np.savez_compressed(out / "samples.npz", **arrays)
    (out / "train.json").write_text(json.dumps(result, indent=2, default=float) + "\n")


# ------------------------------------------------------------------------------------------------ judging
def judge_rows(
    samples: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    judge_ckpt: str,
    data_dir: str | None,
    num_real: int,
    resamples: int,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class accuracy (+ per class) and FID on the judge's features (vs the real test split) of each
    (images uint8 (N, H, W, C), labels) entry, with 95% bootstrap intervals; a `real` row of `num_real`
    class-balanced training images scored the same way (the figures at this sample size of a perfect model).
    Returns the rows, the number of real test images and the entries scored (real first)."""
    import torch

    from diffusion_lab.data.mnist import FashionMNISTDataModule
    from diffusion_lab.metrics.features import ClassifierFeatures, extract_all
    from diffusion_lab.metrics.fid import fid_from_features
    from diffusion_lab.metrics.intervals import bootstrap_intervals

    judge = ClassifierFeatures(ckpt=judge_ckpt)
    dm = FashionMNISTDataModule(data_dir=data_dir, image_size=32)
    dm.setup("test")
    test = torch.stack([dm.test_set[i]["image"] for i in range(len(dm.test_set))])
    real_feats, _ = extract_all(judge, test, batch_size=500, device="cpu")
    train_labels = np.asarray(dm.train_set.labels)[dm.train_set.indices]
    rng = np.random.default_rng(seed)
    per = -(-num_real // 10)
    pick = np.concatenate(
        [rng.choice(np.flatnonzero(train_labels == k), per, replace=False) for k in range(10)]
    )
    real_imgs = _to_uint8(torch.stack([dm.train_set[int(i)]["image"] for i in pick]))
    entries = {"real": (real_imgs, train_labels[pick]), **samples}
    rows = {}
    for name, (images, labels) in entries.items():
        feats, logits = extract_all(judge, images, batch_size=500, device="cpu")
        correct = logits.argmax(1) == np.asarray(labels)
        acc_ci = bootstrap_intervals(
            lambda i, c=correct: {"acc": float(c[i].mean())}, len(correct), resamples=resamples, seed=seed
        )["acc"]
        fid_ci = bootstrap_intervals(  # FID costs a matrix square root per resample: fewer of them
            lambda i, f=feats: {"fid": fid_from_features(real_feats, f[i])},
            len(feats),
            resamples=max(50, resamples // 5),
            seed=seed,
        )["fid"]
        rows[name] = {
            "num_samples": int(len(correct)),
            "class_accuracy": float(correct.mean()),
            "class_accuracy_ci95": acc_ci,
            "fid": float(fid_from_features(real_feats, feats)),
            "fid_ci95": fid_ci,
            "per_class_accuracy": [float(correct[np.asarray(labels) == k].mean()) for k in range(10)],
        }
    return rows, len(test), entries


# ------------------------------------------------------------------------------------------------ tables
def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"Peer race: {s['budget']} wall each ({s['budget_s']:g} s), one thread each, all started together; "
        f"{s['num_samples']} class-balanced samples per row at {s['nfe']} NFE; judge {s['judge_ckpt']} "
        f"(FID on its features vs the {result['real_test_images']} real test images; 95% bootstrap intervals). "
        "Train CPU-s: the contender process's user+sys up to the end of training (ours: the whole train run, its "
        "start-up and end-of-run callbacks included).",
        "",
        "| run | sampling | NFE | steps x batch (images seen) | train CPU-s | class accuracy | FID (judge features) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["rows"].items():
        t = result["contenders"].get(r.get("contender", ""), {})
        seen = (
            f"{t['steps']} x {t['images_seen'] // max(t['steps'], 1)} ({t['images_seen'] / 1000:.1f}k)"
            if t
            else ""
        )
        cpu = f"{t['train_cpu_s']:.0f}" if t else ""
        acc, (alo, ahi) = r["class_accuracy"], r["class_accuracy_ci95"]
        fid, (flo, fhi) = r["fid"], r["fid_ci95"]
        lines.append(
            f"| {name} | {r.get('sampling', 'real training images')} | {r.get('nfe', 0)} | {seen} | {cpu} "
            f"| {acc:.3f} [{alo:.3f}, {ahi:.3f}] | {fid:.2f} [{flo:.2f}, {fhi:.2f}] |"
        )
    lines += ["", "Per-class accuracy:", "", "| run | " + " | ".join(str(k) for k in range(10)) + " |"]
    lines.append("| --- |" + " --- |" * 10)
    for name, r in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in r["per_class_accuracy"]) + " |")
    return "\n".join(lines)


def write_grids(samples: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, *, per_class: int = 10) -> None:
    """grids/<row>.png (rows = classes, up to `per_class` samples each) and grids/side_by_side.png (all rows in order)."""
    from diffusion_lab.images import make_grid, save_png

    tiles = []
    for name, (images, labels) in samples.items():
        per_class = min(per_class, *(int((labels == k).sum()) for k in range(10)))
        pick = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(10)])
        grid = make_grid(images[pick], nrow=per_class)
        save_png(grid, out / "grids" / f"{name}.png")
        tiles.append(grid)
    gap = np.full((tiles[0].shape[0], 8, tiles[0].shape[2]), 255, dtype=np.uint8)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    save_png(row, out / "grids" / "side_by_side.png", min_size=1024)


# ------------------------------------------------------------------------------------------------ the race
def run_race(argv: list[str]) -> dict[str, Any]:
    settings, ours, peers = parse_args(argv)
    judge = settings["judge_ckpt"]
    if not judge or not Path(str(judge)).is_file():
        raise ValueError(JUDGE_HINT + (f" ({judge} is not a file)" if judge else ""))
    if settings["rescore"]:
        return rescore(
            Path(settings["rescore"]), judge_ckpt=str(judge), argv=argv, bootstrap=settings["bootstrap"]
        )
    missing = [p for p in PEERS if p in settings["contenders"] and not _importable(p)]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} not installed: pip install -e .[bench] (or contenders=[ours])"
        )
    out = Path(settings["out"] or f"outputs/race/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    launch = {"settings": settings, "our_overrides": ours, "peers": peers, "argv": argv}
    (out / "launch.json").write_text(json.dumps(launch, indent=2) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    per_class = -(-int(settings["num_samples"]) // 10)
    procs = {}
    for name in settings["contenders"]:
        folder = out / name
        folder.mkdir(exist_ok=True)
        spec = {
            "name": name,
            "budget_s": settings["budget_s"],
            "seed": int(settings["seed"]),
            "num_samples": per_class * 10,
            "nfe": int(settings["nfe"]),
            "guidance": float(settings["guidance"]),
            "sample_batch": int(settings["sample_batch"]),
            "data_dir": settings["data_dir"],
            "peer": peers.get(name),
            "overrides": [*ours, *shlex.split(settings["candidates"].get(name, ""))],
        }
        (folder / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        log = open(folder / "worker.log", "w")  # noqa: SIM115 - closed when the worker ends
        cmd = [sys.executable, "-m", "diffusion_lab.race", "--worker", str(folder / "spec.json")]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    print(f"[race] {', '.join(procs)} started: {settings['budget_s']:g} s of training each; folder {out}")
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    if failed:
        raise RuntimeError(f"contender(s) {', '.join(failed)} failed: see {out}/<name>/worker.log")
    return score(out, settings=settings, ours=ours, peers=peers, argv=argv)


def rescore(out: Path, *, judge_ckpt: str, argv: list[str], bootstrap: int) -> dict[str, Any]:
    """Judge a finished race folder again (another judge, more resamples): its samples are kept."""
    launch_file = out / "launch.json"
    if not launch_file.is_file():
        raise ValueError(f"rescore={out}: no launch.json there (not a race folder)")
    launch = json.loads(launch_file.read_text())
    settings = {**launch["settings"], "judge_ckpt": judge_ckpt, "bootstrap": bootstrap}
    return score(
        out, settings=settings, ours=launch["our_overrides"], peers=launch["peers"], argv=launch["argv"]
    )


def score(
    out: Path, *, settings: dict[str, Any], ours: list[str], peers: dict[str, Any], argv: list[str]
) -> dict[str, Any]:
    """Judge every contender's samples in `out`; write race.json, race.md and grids/."""
    judge = settings["judge_ckpt"]
    per_class = -(-int(settings["num_samples"]) // 10)
    contenders, samples, rows_meta = {}, {}, {}
    for name in settings["contenders"]:
        info = json.loads((out / name / "train.json").read_text())
        with np.load(out / name / "samples.npz") as z:
            for row_name, row in info.pop("rows").items():
                samples[row_name] = (z[f"{row_name}__images"], z[f"{row_name}__labels"])
                rows_meta[row_name] = {**row, "contender": name}
        contenders[name] = info
    scored, num_test, entries = judge_rows(
        samples,
        judge_ckpt=str(judge),
        data_dir=settings["data_dir"],
        num_real=per_class * 10,
        resamples=int(settings["bootstrap"]),
        seed=int(settings["seed"]),
    )
    rows = {name: {**rows_meta.get(name, {}), **r} for name, r in scored.items()}
    result = {
        "settings": settings,
        "our_overrides": ours,
        "peers": {p: peers[p] for p in PEERS if p in settings["contenders"]},
        "contenders": contenders,
        "rows": rows,
        "real_test_images": num_test,
        "command": "python -m diffusion_lab.bench race " + shlex.join(argv),
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    (out / "race.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    table = format_table(result)
    (out / "race.md").write_text(table + "\n")
    write_grids(entries, out)
    print(table)
    print(f"[race] wrote {out / 'race.md'}, race.json and grids/")
    return result


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return None
    try:
        return run_race(argv)
    except ValueError as e:
        print(f"[race] {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
