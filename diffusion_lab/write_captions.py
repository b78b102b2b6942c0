"""Captions of a data set as JSON lines: `python -m diffusion_lab.write_captions --dataset celeba --out F`."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffusion_lab import conf
from diffusion_lab.imports import locate


def datasets() -> dict[str, str]:
    """Short name -> data module `_target_`, read from `conf/data/*.yaml` (the configs are the one list)."""
    return {
        path.stem: OmegaConf.load(path)["_target_"]
        for path in sorted((Path(conf.__file__).parent / "data").glob("*.yaml"))
    }


def build_datamodule(dataset: str, **kwargs: Any):
    """Instantiate a data module by short name with captions on, passing only the kwargs it accepts."""
    known = datasets()
    if dataset not in known:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(known)}")
    cls = locate(known[dataset])
    accepted = inspect.signature(cls.__init__).parameters
    return cls(captions=True, **{k: v for k, v in kwargs.items() if k in accepted and v is not None})


def write_captions_jsonl(dataset, out: str | Path, *, per_image: int = 1, limit: int | None = None) -> int:
    """Write {index, id, captions, label?/class_name?/attributes?} per item of an ImageDataset; returns lines."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    with open(out, "w", encoding="utf-8") as f:
        for i in range(n):
            j = int(dataset.indices[i])
            record = {"index": i, **dataset.info(i), "captions": dataset.captioner.captions(j, per_image)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return n


def main(argv: Sequence[str] | None = None) -> None:
    """python -m diffusion_lab.write_captions --dataset celeba --data-dir D --split val --out captions.jsonl"""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True, choices=sorted(datasets()))
    ap.add_argument("--data-dir", default=None, help="the data set's folder (not needed for digits)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--out", required=True, help="output .jsonl file")
    ap.add_argument(
        "--per-image", type=int, default=1, help="distinct captions per image (first = eval caption)"
    )
    ap.add_argument("--seed", type=int, default=0, help="the data module's seed (splits and captions)")
    ap.add_argument("--limit", type=int, default=None, help="write at most this many images")
    args = ap.parse_args(argv)
    dm = build_datamodule(args.dataset, data_dir=args.data_dir, seed=args.seed)
    dm.setup()
    n = write_captions_jsonl(
        getattr(dm, f"{args.split}_set"), args.out, per_image=args.per_image, limit=args.limit
    )
    print(f"wrote captions of {n} {args.split} images of {args.dataset} to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
