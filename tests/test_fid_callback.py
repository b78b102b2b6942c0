"""FID callback: logged during a tiny training run and equal to an independent recomputation; DDP shares add up."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_lab.callbacks.fid import FID
from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.diffusion import get_sampler
from diffusion_lab.diffusion.utils import randn_like
from diffusion_lab.generate import balanced_labels, generate, iter_chunks
from diffusion_lab.metrics.features import RandomConvFeatures, extract_all
from diffusion_lab.metrics.fid import fid_from_features
from diffusion_lab.train import train

from conftest import TINY, compose

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def test_fid_logged_during_training_matches_recomputation(tmp_path):
    from diffusion_lab.checkpoints import load_system

    cb = FID(
        feature=RandomConvFeatures(in_channels=1, width=4),
        sampler=get_sampler("ddim", steps=2),
        every_n_steps=2,
        num_samples=10,
        batch_size=4,
        guidance_scale=2.0,
        cache_dir=str(tmp_path / "cache"),
    )
    run = tmp_path / "run"
    summary = train(compose("train", [*TINY, "callbacks.class_accuracy=null"], run), extra_callbacks=[cb])
    assert [step for step, _ in cb.history] == [2, 4]
    assert summary["fid_random"] == cb.history[-1][1] and math.isfinite(summary["fid_random"])
    assert cb.cache.computed == 1 and len(list((tmp_path / "cache").glob("*_test_8px_random_*.npz"))) == 1
    logged = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("eval/fid_random")]
    assert [int(r["step"]) for r in logged] == [2, 4]

    # the same number from the checkpoint's EMA weights, the cached real features and the shared sampler
    model, _ = load_system(run / "checkpoints" / "last.ckpt")
    images = torch.cat(
        [
            x
            for _, _, x in generate(
                model,
                sampler=cb.sampler,
                num_samples=10,
                seed=0,
                batch_size=4,
                guidance_scale=2.0,
                labels=balanced_labels(10, 10),
            )
        ]
    )
    with np.load(next((tmp_path / "cache").glob("*.npz"))) as z:
        real = z["features"]
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    np.testing.assert_allclose(
        real,
        extract_all(cb.feature, torch.stack([dm.test_set[i]["image"] for i in range(len(dm.test_set))]))[0],
        rtol=1e-5,
        atol=1e-6,
    )
    fake = extract_all(cb.feature, images)[0]
    assert cb.history[-1][1] == pytest.approx(fid_from_features(real, fake), rel=1e-4)


def test_fid_config_opt_in(tmp_path):
    from hydra.utils import instantiate

    cfg = compose(
        "train", [*TINY, "callbacks=[default,fid]", f"callbacks.fid.cache_dir={tmp_path}"], tmp_path
    )
    assert cfg.callbacks.fid.feature._target_.endswith("InceptionFeatures")
    assert "fid" not in compose("train", TINY, tmp_path).callbacks  # not in the quickstart's defaults
    cfg = compose(
        "train",
        [*TINY, "callbacks=[default,fid_classifier]", f"callbacks.fid.feature.ckpt={tmp_path / 'no.ckpt'}"],
        tmp_path,
    )
    with pytest.raises(Exception, match="experiment=digits_classifier"):
        instantiate(cfg.callbacks.fid)


def test_chunks_are_split_across_ranks_and_seeded_by_chunk():
    assert [c for r in range(3) for c in iter_chunks(10, 3, rank=r, world_size=3)] == [
        (0, 0, 3),
        (3, 9, 10),
        (1, 3, 6),
        (2, 6, 9),
    ]
    model = _ToyModel()
    s = get_sampler("ddpm", steps=2)
    one = torch.cat([x for _, _, x in generate(model, sampler=s, num_samples=10, seed=3, batch_size=3)])
    parts = {
        lo: x
        for r in range(2)
        for lo, _, x in generate(model, sampler=s, num_samples=10, seed=3, batch_size=3, rank=r, world_size=2)
    }
    torch.testing.assert_close(torch.cat([parts[k] for k in sorted(parts)]), one)


class _ToyModel(nn.Module):
    """Stands in for a diffusion system: x0 = tanh(x_T / 2) + sampler noise from the run's generator."""

    num_classes = None
    sample_shape = (1, 8, 8)

    @property
    def device(self):
        return torch.device("cpu")

    def condition(self, *, labels, prompts):
        return {}

    def sample(self, *, sampler, x_T, cond, guidance, generator, progress):
        return (torch.tanh(x_T / 2) + 0.3 * randn_like(x_T, generator)).clamp(-1, 1)


def _fid_on_rank(rank: int, world_size: int, tmp: str) -> tuple[float, int]:
    if world_size > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world_size
        )
    torch.set_num_threads(1)
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    cb = FID(
        feature=RandomConvFeatures(in_channels=1, width=4),
        sampler=get_sampler("ddim", steps=2),
        num_samples=21,
        batch_size=4,
        cache_dir=f"{tmp}/cache",
    )
    trainer = SimpleNamespace(
        global_step=7,
        global_rank=rank,
        world_size=world_size,
        is_global_zero=rank == 0,
        datamodule=dm,
        loggers=[],
        callback_metrics={},
        callbacks=[],
    )
    value = cb.evaluate(trainer, _ToyModel())
    out = (value, cb.cache.computed)
    if world_size > 1:
        Path(tmp, f"rank{rank}.txt").write_text(f"{out[0]!r} {out[1]}")
        torch.distributed.destroy_process_group()
    return out


@pytest.mark.slow
def test_fid_callback_under_ddp_equals_single_process(tmp_path):
    """Two gloo ranks: each samples its chunks, only rank 0 holds (and writes) real statistics; torchmetrics'
    sum over ranks gives exactly the single-process FID."""
    import torch.multiprocessing as mp

    single, computed = _fid_on_rank(0, 1, str(tmp_path / "single"))
    assert computed == 1
    (tmp_path / "ddp").mkdir()
    # fork: no re-import in the children (spawn costs tens of seconds here); they use one thread, so no OpenMP
    mp.start_processes(
        _fid_on_rank, args=(2, str(tmp_path / "ddp")), nprocs=2, join=True, start_method="fork"
    )
    results = [Path(tmp_path / "ddp", f"rank{r}.txt").read_text().split() for r in range(2)]
    assert [int(c) for _, c in results] == [1, 0]  # rank 1 never touched the real data or the cache
    for value, _ in results:
        assert float(value) == pytest.approx(single, rel=1e-6)
    assert len(list((tmp_path / "ddp" / "cache").glob("*.npz"))) == 1
