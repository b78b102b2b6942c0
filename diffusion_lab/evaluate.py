"""Evaluation entry point: `python -m diffusion_lab.evaluate ckpt=PATH samplers=[..] steps=[..]` -> metrics vs NFE.

For every (sampler, steps, guidance scale) cell it draws `num_samples` fixed-seed samples (cached as one .npz per
cell under `<out>/samples/`, so a rerun skips what exists), and scores them against the real `split` of the
checkpoint's own data config with each feature extractor: FID, KID, precision / recall, Inception Score (where
the extractor has logits) and conditional accuracy (class models, judged by the trained classifier). Writes
`metrics.csv`, `metrics.md` and `metrics_vs_nfe.png` into `out` (default: `<run>/eval/`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from diffusion_lab.checkpoints import load_system, trust_from_config
from diffusion_lab.cli import exit_on_user_error, file_argument
from diffusion_lab.console import quiet
from diffusion_lab.data.base import md5sum
from diffusion_lab.data.transforms import to_uint8
from diffusion_lab.diffusion import get_sampler
from diffusion_lab.generate import (
    SEEDING_RULE,
    balanced_labels,
    generate,
    guidance_options,
    random_labels,
    resolve_device,
    seed_range,
)
from diffusion_lab.images import log_image
from diffusion_lab.metrics.features import (
    FEATURE_EXTRACTORS,
    ClassifierFeatures,
    FeatureExtractor,
    extract_all,
    get_feature_extractor,
    uint8_to_images,
)
from diffusion_lab.metrics.fid import RealFeatureCache, describe_datamodule, save_npz
from diffusion_lab.metrics.intervals import mean_interval
from diffusion_lab.metrics.scoring import accuracy_with_interval, score_with_intervals
from diffusion_lab.sample import number
from diffusion_lab.tables import (
    EVAL_INFO,
    EVAL_KEYS,
    columns_of,
    interval_cells,
    markdown_table,
    plot_metrics_vs_nfe,
    write_csv,
)

log = logging.getLogger(__name__)
METRICS = (
    "fid",
    "fid_infinity",  # not by default: FID extrapolated to n = infinity (Chong & Forsyth 2020)
    "kid",
    "precision_recall",
    "inception_score",
    "class_accuracy",
    "prompt_adherence",
)
PROTOCOL_NOTE = (
    "`bootstrap` resamples, seeded by `seed`; it covers the spread of sample sets of this size, not FID's "
    "small-n bias: compare FIDs only at the same n, reference split and extractor (columns seeds, reference, "
    "extractors)"
)
SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------------ set-up
LIST_KEYS = ("samplers", "steps", "guidance_scales", "features", "metrics")


def _check(cfg: DictConfig) -> None:
    for key in LIST_KEYS:  # `features=classifier` means [classifier]
        if isinstance(cfg[key], (str, int, float)):
            cfg[key] = [cfg[key]]

    def names(key: str) -> list:
        value = cfg[key]
        if value is None or len(value) == 0:
            raise ValueError(f"{key} must be a non-empty list, e.g. {key}=[a,b], got {value!r}")
        return list(value)

    for s in names("samplers"):
        get_sampler(s, steps=1)  # unknown names fail listing the choices
    if any(not isinstance(k, int) or k < 1 for k in names("steps")):
        raise ValueError(f"steps must be integers >= 1, got {list(cfg.steps)}")
    if any(number(g, "guidance_scales") < 0 for g in names("guidance_scales")):
        raise ValueError(f"guidance_scales must be >= 0, got {list(cfg.guidance_scales)}")
    for f in names("features"):
        FEATURE_EXTRACTORS.get(f)
    unknown = sorted(set(names("metrics")) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; valid choices: {', '.join(METRICS)}")
    number(cfg.num_samples, "num_samples", integer=True, minimum=2)
    for key in ("batch_size", "pr_k", "kid_subsets", "kid_subset_size"):
        number(cfg[key], key, integer=True, minimum=1)
    number(cfg.seed, "seed", integer=True)
    if cfg.num_real is not None:
        number(cfg.num_real, "num_real", integer=True, minimum=1)
    if not isinstance(cfg.get("sampler_options") or {}, Mapping):
        raise ValueError(
            f"sampler_options must be a mapping, e.g. +sampler_options.grid=karras, got {cfg.sampler_options!r}"
        )
    seed_range(cfg.get("seeds"), cfg.num_samples)  # a range that does not hold num_samples seeds fails here
    if cfg.get("class_sampling", "balanced") not in ("balanced", "random"):
        raise ValueError(f"unknown class_sampling {cfg.class_sampling!r}; valid choices: balanced, random")
    for key in ("split", "reference_split"):
        if cfg[key] not in SPLITS and not (key == "reference_split" and cfg[key] is None):
            raise ValueError(f"unknown {key} {cfg[key]!r}; valid choices: {', '.join(SPLITS)}")
    if cfg.reference_split == cfg.split:
        raise ValueError(f"reference_split must differ from split ({cfg.split}): it is scored against it")
    if "classifier" in cfg.features and not cfg.classifier_ckpt:
        raise ValueError(
            "features=[classifier] needs classifier_ckpt=PATH: a checkpoint of `python -m diffusion_lab.train "
            "experiment=digits_classifier` (or fashion_mnist_classifier) on the model's data"
        )


def build_extractors(cfg: DictConfig, *, channels: int) -> dict[str, FeatureExtractor]:
    opts = {
        "classifier": {"ckpt": cfg.classifier_ckpt},
        "inception": {"weights": cfg.inception_weights},
        "random": {"in_channels": channels},
    }
    return {name: get_feature_extractor(name, **opts.get(name, {})) for name in cfg.features}


def real_split(data_config: dict, split: str):
    """The checkpoint's data module (built from its stored config) and its `split` dataset."""
    dm = instantiate(OmegaConf.create(data_config))
    dm.setup("test")
    return dm, split_of(dm, split)


def split_of(dm, split: str):
    ds = getattr(dm, f"{split}_set", None)
    if ds is None:
        raise ValueError(f"the data module {type(dm).__name__} has no {split} split")
    return ds


# ------------------------------------------------------------------------------------------------ samples
def cell_name(sampler: str, steps: int, guidance: float, seed: int, n: int) -> str:
    return f"{sampler}_steps{steps}_g{guidance:g}_seed{seed}_n{n}"


def load_or_generate(
    cfg: DictConfig,
    model,
    out: Path,
    setup: dict[str, Any],
    sampler_name: str,
    steps: int,
    guidance_scale: float,
) -> tuple[dict[str, np.ndarray], str]:
    """The cell's samples from `<out>/samples/<stem>.npz` when it holds this checkpoint's, else sampled now and
    saved there; and the stem that names the cell's files."""
    opts = dict(cfg.get("sampler_options") or {})
    sampler = get_sampler(sampler_name, steps=steps, **opts)
    stem = cell_name(sampler_name, steps, guidance_scale, cfg.seed, cfg.num_samples)
    if opts:  # options change the samples: keep their cache apart
        stem += "_" + "_".join(f"{k}-{v}" for k, v in sorted(opts.items()))
    stem += "".join(f"_{k}-{v}" for k, v in setup["extra"].items() if v is not None)
    path = out / "samples" / f"{stem}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                data = {k: z[k] for k in z.files}
            same = str(data.get("ckpt_md5")) == setup["ckpt_id"] and str(data.get("seeding")) == SEEDING_RULE
            if same and len(data["images"]) == cfg.num_samples:
                return {**data, "cached": True}, stem
            log.warning("%s was sampled from another checkpoint or by older code; sampling again", path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("unreadable sample cache %s (%s); sampling again", path, e)
    start = time.time()
    images = None  # (N, H, W, C) uint8, shaped by the first decoded chunk (latent models decode to pixels)
    for lo, hi, x in generate(
        model,
        sampler=sampler,
        num_samples=cfg.num_samples,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        guidance_scale=guidance_scale,
        labels=setup["labels"],
        prompts=setup["prompts"],
        progress=cfg.progress,
        guidance=setup["guidance_opts"],
        first_index=setup["seeds"].start,
    ):
        chunk = to_uint8(x)
        if images is None:
            images = np.zeros((cfg.num_samples, *chunk.shape[1:]), dtype=np.uint8)
        images[lo:hi] = chunk
    data: dict[str, Any] = {
        "images": images,
        "nfe": np.array(sampler.nfe),
        "seconds": np.array(time.time() - start),
        "ckpt_md5": np.array(setup["ckpt_id"]),
        "seeding": np.array(SEEDING_RULE),
    }
    if setup["labels"] is not None:
        data["labels"] = setup["labels"].numpy()
    if setup["prompts"] is not None:
        data["prompts"] = np.array(setup["prompts"])
    save_npz(path, **data)
    return {**data, "cached": False}, stem


def fake_features(
    extractor: FeatureExtractor, images: np.ndarray, path: Path, *, batch_size: int, device
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and logits) of a cell's samples, cached next to them per extractor fingerprint."""
    if path.is_file():
        with np.load(path) as z:
            if len(z["features"]) == len(images):
                return z["features"], (z["logits"] if "logits" in z.files else None)
    feats, logits = extract_all(extractor, images, batch_size=batch_size, device=device)
    save_npz(path, features=feats, **({"logits": logits} if logits is not None else {}))
    return feats, logits


# ------------------------------------------------------------------------------------------------ scoring
def score_features(
    name: str, real: np.ndarray, fake: np.ndarray, logits: np.ndarray | None, cfg: DictConfig, real_stats=None
) -> dict[str, float]:
    """The metrics of one feature set, each with its bootstrap interval (`metrics.scoring`)."""
    return score_with_intervals(
        name,
        real,
        fake,
        logits,
        metrics=cfg.metrics,
        real_stats=real_stats,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size,
        pr_k=cfg.pr_k,
        resamples=cfg.get("bootstrap", 200),
        seed=cfg.seed,
    )


def with_accuracy(row: dict[str, Any], logits: np.ndarray, labels: np.ndarray, cfg: DictConfig) -> None:
    """row["class_accuracy"] and its interval (`_lo`, `_hi`)."""
    acc = accuracy_with_interval(logits, labels, resamples=cfg.get("bootstrap", 200), seed=cfg.seed)
    row["class_accuracy"], row["class_accuracy_lo"], row["class_accuracy_hi"] = acc


def real_features(
    cfg: DictConfig, extractors: dict, cache, dm, split: str, num_real: int | None, device
) -> dict:
    """(features, logits) of the first `num_real` images of the real `split` per extractor, through the cache."""
    ds = split_of(dm, split)
    return {
        name: cache.get(
            ext,
            ds,
            description=describe_datamodule(dm),
            split=split,
            num_real=num_real,
            batch_size=cfg.batch_size,
            device=device,
            progress=cfg.progress,
        )
        for name, ext in extractors.items()
    }


def reference_stats(cfg: DictConfig, extractors: dict, cache, dm, ds, real: dict) -> dict:
    """FID's reference per extractor: the real split's statistics, cached under its content hash."""
    return {
        name: cache.stats(
            ext,
            ds,
            description=describe_datamodule(dm),
            split=cfg.split,
            num_real=cfg.num_real,
            features=real[name],
        )
        for name, ext in extractors.items()
    }


def reference_row(
    cfg: DictConfig,
    dm,
    extractors: dict[str, FeatureExtractor],
    judge,
    real: dict,
    cache,
    *,
    device,
    real_stats: dict | None = None,
) -> dict[str, Any]:
    """Real images of `reference_split` (the first `num_samples`) scored like a sample cell: the values a
    model that reproduced its data exactly would get at this sample size (the metrics' noise floor)."""
    ds = split_of(dm, cfg.reference_split)
    n = min(cfg.num_samples, len(ds))
    row: dict[str, Any] = {
        "sampler": f"real_{cfg.reference_split}",
        "steps": 0,
        "nfe": 0,
        "guidance_scale": None,
        "num_samples": n,
        "seed": cfg.seed,
        "sample_seconds": 0.0,
    }
    features = real_features(cfg, extractors, cache, dm, cfg.reference_split, n, device)
    labels = (
        (lambda: np.array([ds[i]["label"] for i in range(n)])) if getattr(dm, "num_classes", None) else None
    )
    images = lambda: torch.stack([ds[i]["image"] for i in range(n)])  # noqa: E731 - decoded only when needed
    row.update(score_set(cfg, features, real, judge, labels, images, device=device, real_stats=real_stats))
    return row


def output_folder(cfg: DictConfig) -> Path:
    """`out`, default `<run>/eval`, with its `samples/` folder made; ValueError when it cannot be written."""
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "eval"
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the output folder {out}: {e.strerror}") from e
    return out


@trust_from_config
def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Score every (sampler, steps, guidance) cell; write metrics.csv / .md / _vs_nfe.png; return the rows."""
    if cfg.get("sigma_rels"):
        return evaluate_sigma_rels(cfg)
    _check(cfg)
    file_argument(cfg.ckpt, "ckpt")
    device = resolve_device(cfg.device)
    model, config = load_system(cfg.ckpt, device=device)  # refuses checkpoints of other systems
    out = output_folder(cfg)
    dm, ds = real_split(config["data"], cfg.split)
    extractors = build_extractors(cfg, channels=dm.channels)
    judge = extractors.get("classifier") or (
        ClassifierFeatures(ckpt=cfg.classifier_ckpt) if cfg.classifier_ckpt else None
    )
    num_classes = model.num_classes
    if judge is not None and num_classes is not None and judge.num_classes != num_classes:
        raise ValueError(
            f"the classifier {cfg.classifier_ckpt} has {judge.num_classes} classes, the model {num_classes}: "
            "use a classifier trained on the model's data"
        )
    cache = RealFeatureCache(cfg.cache_dir)
    real = {
        k: v[0] for k, v in real_features(cfg, extractors, cache, dm, cfg.split, cfg.num_real, device).items()
    }
    real_stats = reference_stats(cfg, extractors, cache, dm, ds, real)
    setup = sampling_setup(cfg, model, ds, device=device)
    protocol = {  # written beside every number: what it was measured against and how
        "seeds": f"{setup['seeds'].start}-{setup['seeds'].stop - 1}",
        "class_sampling": None if setup["labels"] is None else cfg.get("class_sampling", "balanced"),
        "reference": f"{cfg.split}:{next(iter(real_stats.values())).n}" if real_stats else None,
        "extractors": " ".join(f"{k}:{e.fingerprint[-12:]}" for k, e in extractors.items()),
    }

    rows: list[dict[str, Any]] = []
    if cfg.reference_split is not None:
        ref = reference_row(cfg, dm, extractors, judge, real, cache, device=device, real_stats=real_stats)
        rows.append({**ref, **protocol, "seeds": None, "class_sampling": None})

    cells = [(s, int(k), g) for s in cfg.samplers for k in cfg.steps for g in setup["guidance_scales"]]
    for name, steps, g in tqdm(cells, desc="evaluate", disable=not cfg.progress):
        data, stem = load_or_generate(cfg, model, out, setup, name, steps, g)
        row: dict[str, Any] = {
            "sampler": name,
            "steps": steps,
            "nfe": int(data["nfe"]),
            "guidance_scale": g,
            "num_samples": cfg.num_samples,
            "seed": cfg.seed,
            "sample_seconds": round(float(data["seconds"]), 2),
        }
        row.update(
            score_cell(
                cfg,
                data,
                out / "features" / stem,
                extractors,
                real,
                judge,
                setup,
                device=device,
                real_stats=real_stats,
            )
        )
        rows.append({**row, **protocol})
        # after every cell, so an interrupted run keeps the rows it has
        write_tables(rows, out, title=_title(cfg, ds, dm))
    plot_metrics_vs_nfe(rows, out / "metrics_vs_nfe.png")
    info = {
        "ckpt": str(cfg.ckpt),
        "real_split": cfg.split,
        "real_images": len(next(iter(real.values()))),
        "protocol": {**protocol, "extractors": {k: e.fingerprint for k, e in extractors.items()}},
        "data": describe_datamodule(dm),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out / "eval.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    log.info("wrote %s, %s and %s", out / "metrics.csv", out / "metrics.md", out / "metrics_vs_nfe.png")
    log_to_wandb(cfg, rows, out, train_config=config)
    return rows


def sampling_setup(cfg: DictConfig, model, ds, *, device) -> dict[str, Any]:
    """What every cell samples with: balanced class `labels` or the split's `prompts`, the `guidance_scales` (1 for
    an unguided model) and `guidance_opts`, the prompt `scorer`; what keys their cache (`ckpt_id`, `extra`)."""
    num_classes = model.num_classes
    text = model.is_text_conditional
    seeds = seed_range(cfg.get("seeds"), cfg.num_samples)
    labels = None
    if num_classes is not None and not text:
        labels = (
            random_labels(cfg.num_samples, num_classes, seed=cfg.seed, start=seeds.start)
            if cfg.get("class_sampling") == "random"
            else balanced_labels(cfg.num_samples, num_classes, start=seeds.start)
        )
    prompts = _prompts(ds, cfg.num_samples) if text else None
    scorer = (
        instantiate(cfg.prompt_scorer)
        if text and cfg.prompt_scorer and "prompt_adherence" in cfg.metrics
        else None
    )
    guidance_opts = guidance_options(cfg, model, device=device)
    guided = labels is not None or text or guidance_opts.guide is not None
    guidance = [float(g) for g in cfg.guidance_scales] if guided else [1.0]
    ckpt_id = md5sum(cfg.ckpt)
    extra = {  # guidance refinements change the samples: keep their cache apart
        "rescale": guidance_opts.rescale or None,
        "interval": "-".join(f"{v:g}" for v in guidance_opts.interval or []) or None,
        "guide": md5sum(cfg.guide_ckpt)[:8] if cfg.get("guide_ckpt") else None,
        "seeds": f"{seeds.start}-{seeds.stop - 1}" if seeds.start else None,
        "labels": "random" if labels is not None and cfg.get("class_sampling") == "random" else None,
    }
    return dict(labels=labels, prompts=prompts, scorer=scorer, guidance_opts=guidance_opts, guidance_scales=guidance,
                ckpt_id=ckpt_id, extra=extra, seeds=seeds)  # fmt: skip


def score_cell(
    cfg: DictConfig,
    data: dict,
    features_stem: Path,
    extractors: dict,
    real: dict,
    judge,
    setup,
    *,
    device,
    real_stats: dict | None = None,
) -> dict[str, float]:
    """Every configured metric of a cell's samples (features cached as `<features_stem>.<extractor>-<id>.npz`)."""
    features = {
        fname: fake_features(
            ext,
            data["images"],
            features_stem.with_name(f"{features_stem.name}.{fname}-{ext.fingerprint[:12]}.npz"),
            batch_size=cfg.batch_size,
            device=device,
        )
        for fname, ext in extractors.items()
    }
    labels = (lambda: data["labels"]) if "labels" in data else None
    row = score_set(
        cfg, features, real, judge, labels, lambda: data["images"], device=device, real_stats=real_stats
    )
    if setup["scorer"] is not None:
        images = uint8_to_images(data["images"]).to(device)
        scores = setup["scorer"](images, [str(p) for p in data["prompts"]]).float().cpu().numpy()
        row["prompt_adherence"] = float(scores.mean())
        lo_hi = mean_interval(scores, resamples=cfg.get("bootstrap", 200), seed=cfg.seed)
        row["prompt_adherence_lo"], row["prompt_adherence_hi"] = lo_hi
    return row


def score_set(
    cfg: DictConfig,
    features: dict,
    real: dict,
    judge,
    labels,
    images,
    *,
    device,
    real_stats: dict | None = None,
) -> dict[str, float]:
    """The metrics of one image set from its (features, logits) per extractor; class accuracy from the judge's
    logits (the `classifier` extractor's, else computed on `images()`) against `labels()` when there are any."""
    row: dict[str, float] = {}
    for fname, (feats, logits) in features.items():
        row.update(score_features(fname, real[fname], feats, logits, cfg, (real_stats or {}).get(fname)))
    if "class_accuracy" in cfg.metrics and judge is not None and labels is not None:
        logits = features["classifier"][1] if "classifier" in features else None
        if logits is None:
            logits = extract_all(judge, images(), batch_size=cfg.batch_size, device=device)[1]
        with_accuracy(row, logits, labels(), cfg)
    return row


def evaluate_sigma_rels(cfg: DictConfig) -> list[dict[str, Any]]:
    """The post-hoc EMA axis (Karras et al. 2024): the checkpoint's run reconstructed at each of `sigma_rels`
    (`diffusion_lab.phema`, from the snapshots in `phema/` beside `ckpt`), each evaluated like a checkpoint into
    `<out>/sigma_rel_<s>/`; the rows, with their sigma_rel, also go to `<out>/metrics_vs_sigma_rel.{csv,md,png}`."""
    from diffusion_lab.phema import posthoc_checkpoints

    sigma_rels = [
        number(s, "sigma_rels")
        for s in (cfg.sigma_rels if isinstance(cfg.sigma_rels, Sequence) else [cfg.sigma_rels])
    ]
    file_argument(cfg.ckpt, "ckpt")
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "eval"
    rows: list[dict[str, Any]] = []
    for i, (sigma_rel, path) in enumerate(
        zip(sigma_rels, posthoc_checkpoints(cfg.ckpt, sigma_rels), strict=True)
    ):
        one = OmegaConf.merge(
            cfg, {"ckpt": str(path), "sigma_rels": None, "out": str(out / f"sigma_rel_{sigma_rel:.3f}")}
        )
        if i:  # the real-data reference row once
            one.reference_split = None
        rows += [{"sigma_rel": sigma_rel if r["nfe"] else None, **r} for r in evaluate(one)]
    metrics = columns_of(rows, ("sigma_rel", *EVAL_KEYS, *EVAL_INFO))
    columns = ["sigma_rel", *EVAL_KEYS, *metrics, *EVAL_INFO]
    write_csv(rows, out / "metrics_vs_sigma_rel.csv", columns=columns)
    lines = [f"# {cfg.ckpt}: post-hoc EMA lengths", "", *markdown_table(rows, columns)]
    (out / "metrics_vs_sigma_rel.md").write_text("\n".join(lines) + "\n")
    by_sigma = [
        {**{k: v for k, v in r.items() if k != "sigma_rel"}, "nfe": r["sigma_rel"] or 0} for r in rows
    ]
    plot_metrics_vs_nfe(by_sigma, out / "metrics_vs_sigma_rel.png", x_label="sigma_rel")
    log.info("wrote %s (and .md, .png)", out / "metrics_vs_sigma_rel.csv")
    return rows


def log_to_wandb(cfg: DictConfig, rows: list[dict[str, Any]], out: Path, *, train_config: dict) -> None:
    """`logger=wandb`: the metrics as a wandb Table (`eval/metrics`), the plot and both configs, in the wandb
    group of the checkpoint's sweep when it came from one (`python -m diffusion_lab.train -m ...`)."""
    from diffusion_lab.instantiate import sweep_group

    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        target = str(node.get("_target_", ""))
        if not target.endswith("WandbLogger"):
            if not target.endswith("CSVLogger"):  # CSV: metrics.csv is evaluate's own
                log.warning(
                    "evaluate logs to wandb only; logger %s ignored (metrics.csv holds the table)", name
                )
            continue
        run_dir = Path(cfg.ckpt).resolve().parent.parent  # <run>/checkpoints/last.ckpt
        kwargs: dict[str, Any] = {"save_dir": str(out)}
        if node.get("group") is None and (run_dir.parent / "multirun.yaml").is_file():
            kwargs["group"] = sweep_group(run_dir.parent)
        if node.get("job_type") is None:
            kwargs["job_type"] = "evaluate"
        if node.get("name") == cfg.get("task_name"):
            kwargs["name"] = f"evaluate/{run_dir.name}"[:128]
        logger = instantiate(node, **kwargs)
        logger.log_hyperparams({"evaluate": OmegaConf.to_container(cfg, resolve=True), "train": train_config})
        columns = [*EVAL_KEYS, *columns_of(rows, (*EVAL_KEYS, *EVAL_INFO)), *EVAL_INFO]
        logger.log_table(
            key="eval/metrics", columns=columns, data=[[r.get(c) for c in columns] for r in rows]
        )
        log_image([logger], "eval/metrics_vs_nfe", out / "metrics_vs_nfe.png")
        logger.experiment.finish()
        log.info("logged eval/metrics to wandb under %s", out / "wandb")


def _prompts(ds, n: int) -> list[str]:
    """Evaluation captions of the real split, cycled to n (the hook for text-conditional models)."""
    if not hasattr(ds, "caption"):
        raise ValueError("a text-conditional model needs a data set with captions (captions=true)")
    return [ds.caption(i % len(ds)) for i in range(n)]


def _title(cfg: DictConfig, ds, dm) -> str:
    n_real = len(ds) if cfg.num_real is None else min(cfg.num_real, len(ds))
    return f"Evaluation of `{cfg.ckpt}` against {n_real} real {cfg.split} images of {type(dm).__name__}"


# ------------------------------------------------------------------------------------------------ outputs
def write_tables(rows: list[dict[str, Any]], out: Path, *, title: str = "Evaluation") -> None:
    """metrics.csv (all values) and metrics.md (the table, plus FID by sampler x steps per extractor)."""
    metrics = columns_of(rows, (*EVAL_KEYS, *EVAL_INFO))
    columns = [*EVAL_KEYS, *metrics, *EVAL_INFO]
    write_csv(rows, out / "metrics.csv", columns=columns)
    lines = [f"# {title}", "", *markdown_table(*interval_cells(rows, columns))]
    lines += ["", f"[lo, hi]: 95% bootstrap interval over the generated samples ({PROTOCOL_NOTE})."]
    refs = [r for r in rows if r["nfe"] == 0]
    cells = {(r["sampler"], r["guidance_scale"], r["steps"]): r for r in rows if r["nfe"] > 0}
    steps = sorted({k for _, _, k in cells})
    heads = [f"{k} steps" for k in steps]
    for col in [c for c in metrics if c.startswith("fid_") and not c.endswith(("_lo", "_hi"))]:
        for g in sorted({g for _, g, _ in cells}):
            table = [
                {"sampler": s, **{h: cells.get((s, g, k), {}).get(col) for k, h in zip(steps, heads)}}
                for s in dict.fromkeys(s for s, _, _ in cells)
            ]
            table += [
                {"sampler": f"{r['sampler']} (reference)", **dict.fromkeys(heads, r.get(col))} for r in refs
            ]
            lines += [
                "",
                f"## {col} (guidance {g:g}): sampler x steps",
                "",
                *markdown_table(table, ["sampler", *heads]),
            ]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # bad input ends with one line `error: <cause>` and exit code 1 (DIFFUSION_LAB_TRACEBACK=1: full traceback)
    quiet()
    torch.set_float32_matmul_precision("high")
    with exit_on_user_error((InstantiationException, OmegaConfBaseException)):
        evaluate(cfg)


if __name__ == "__main__":
    main()
