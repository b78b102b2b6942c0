"""Hostile input at every entry point (train, sample, evaluate, report, phema), run in-process through each CLI's
own `main`: every case exits non-zero with one `error:` line naming the key or file at fault, and no traceback."""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY

QUICK = [
    *TINY,
    "trainer.max_steps=2",
    "callbacks.class_accuracy=null",
    "callbacks.image_logger=null",
    "print_config=false",
]


# ------------------------------------------------------------------------------------------ harness
def cli(entry: str, args: list[str], capfd) -> tuple[int, str]:
    """Run `dl-<entry> args` in this process: (exit code, everything it printed)."""
    module = importlib.import_module(f"diffusion_lab.{entry}")
    if entry == "report":  # its logging.basicConfig: not onto the handlers an earlier Hydra call left behind
        logging.root.handlers.clear()
    argv, sys.argv = sys.argv, [f"dl-{entry}", *args]
    code: int = 0
    text = ""
    try:
        module.main(args) if entry == "report" else module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # what a user would see as a traceback
        code, text = 1, f"Traceback (in-process): {type(e).__name__}: {e}"
    finally:
        sys.argv = argv
    out, err = capfd.readouterr()
    return code, out + err + text


def error_line(code: int, out: str) -> str:
    """The one `error:` line of a refused command (exit != 0, no traceback)."""
    assert code != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if "error: " in ln]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


def check(code: int, out: str, expected: str) -> None:
    line = error_line(code, out)
    assert re.search(expected, line), line


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints: a class model with post-hoc EMA snapshots, an unconditional one, a classifier, and files
    that are not (or no longer) checkpoints."""
    from diffusion_lab.train import train

    from conftest import compose

    root = tmp_path_factory.mktemp("world")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    phema = [
        "callbacks=[default,phema]",
        "callbacks.phema.sigma_rels=[0.05,0.10]",
        "callbacks.phema.every_n_steps=1",
    ]
    train(compose("train", [*QUICK, *phema], root / "class"))
    train(compose("train", [*QUICK, "model.net.num_classes=null"], root / "uncond"))
    train(compose("train", ["experiment=digits_classifier", *QUICK[-1:], *TINY[:3]], root / "classifier"))
    torch.set_num_threads(threads)
    w = {
        "root": root,
        "ckpt": root / "class" / "checkpoints" / "last.ckpt",
        "uncond": root / "uncond" / "checkpoints" / "last.ckpt",
        "classifier": root / "classifier" / "checkpoints" / "last.ckpt",
    }
    (root / "text.ckpt").write_text("not a checkpoint\n")
    w["text"] = root / "text.ckpt"
    data = w["ckpt"].read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    w["truncated"] = root / "truncated.ckpt"
    ckpt = torch.load(w["ckpt"], map_location="cpu", weights_only=False)
    for state in (ckpt["state_dict"], ckpt.get("current_model_state") or {}):
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = torch.full_like(v, float("nan"))
    torch.save(ckpt, root / "nan.ckpt")  # damaged bytes without a .sha256: NaN weights
    w["nan"] = root / "nan.ckpt"
    (root / "a_file").write_text("")
    w["file"] = root / "a_file"
    return w


def fill(args: list[str], world: dict[str, Path], tmp_path: Path) -> list[str]:
    names = {k: str(v) for k, v in world.items()} | {"tmp": str(tmp_path)}
    return [a.format(**names) for a in args]


# ------------------------------------------------------------------------------------------ train
TRAIN = [
    # (override(s), what the one line must say)
    ("trainer.max_steps=abc", r"trainer\.max_steps='abc'"),
    ("trainer.max_steps=0", r"trainer\.max_steps=0"),
    ("trainer.max_steps=-5", r"trainer\.max_steps"),
    ("trainer.max_steps=1.5", r"trainer\.max_steps=1\.5"),
    ("trainer.max_epochs=abc", r"trainer\.max_epochs='abc'"),
    ("trainer.max_time=abc", r"trainer\.max_time"),
    ("trainer.precision=fp99", r"trainer\.precision='fp99'"),
    ("trainer.accelerator=tpu9", r"tpu9"),
    ("trainer.devices=0", r"devices"),
    ("trainer.log_every_n_steps=abc", r"trainer\.log_every_n_steps='abc'"),
    ("trainer.gradient_clip_val=abc", r"trainer\.gradient_clip_val='abc'"),
    ("+trainer.max_step=3", r"trainer\.max_step is not an argument of Trainer"),
    ("seed=abc", r"seed='abc'"),
    ("seed=1.5", r"seed=1\.5"),
    ("seed=[1]", r"seed=\[1\]"),
    ("data.image_size=0", r"data\.image_size=0"),
    ("data.image_size=-8", r"data\.image_size=-8"),
    ("data.image_size=abc", r"data\.image_size='abc'"),
    ("data.image_size=7", r"data\.image_size=7"),
    ("data.channels=0", r"data\.channels=0"),
    ("data.channels=-1", r"data\.channels=-1"),
    ("data.channels=abc", r"data\.channels='abc'"),
    ("data.batch_size=0", r"data\.batch_size=0"),
    ("data.batch_size=-1", r"data\.batch_size=-1"),
    ("data.batch_size=abc", r"data\.batch_size='abc'"),
    ("data.batch_size=[1,2]", r"data\.batch_size=\[1, 2\]"),
    ("data.num_workers=-1", r"data\.num_workers=-1"),
    ("data.val_fraction=1.0", r"data\.val_fraction=1\.0"),
    ("data.val_fraction=-0.1", r"data\.val_fraction=-0\.1"),
    ("data.val_fraction=abc", r"data\.val_fraction='abc'"),
    ("data.test_fraction=0.95", r"test_fraction"),
    ("+data.image_sise=8", r"data\.image_sise is not an argument"),
    ("model.optimizer.lr=abc", r"model\.optimizer\.lr='abc'"),
    ("model.optimizer.lr=-1", r"model\.optimizer\.lr=-1"),
    ("model.optimizer.lr=nan", r"model\.optimizer\.lr=nan"),
    ("model.optimizer.lr=[1]", r"model\.optimizer\.lr=\[1\]"),
    ("model.optimizer.weight_decay=abc", r"model\.optimizer\.weight_decay='abc'"),
    ("model.optimizer.betas=abc", r"model\.optimizer\.betas='abc'"),
    ("model.optimizer._target_=torch.optim.Nope", r"torch\.optim\.Nope"),
    ("model.cond_drop_prob=high", r"model\.cond_drop_prob='high'"),
    ("model.cond_drop_prob=1.5", r"model\.cond_drop_prob=1\.5"),
    ("model.cond_drop_prob=-0.1", r"model\.cond_drop_prob=-0\.1"),
    ("model.net.base_channels=0", r"model\.net\.base_channels=0"),
    ("model.net.base_channels=abc", r"model\.net\.base_channels='abc'"),
    ("model.net.channel_mult=[]", r"model\.net\.channel_mult"),
    ("model.net.channel_mult=abc", r"model\.net\.channel_mult='abc'"),
    ("model.net.num_heads=0", r"model\.net\.num_heads=0"),
    ("model.net.num_heads=3", r"num_heads"),
    ("model.net.num_classes=5", r"model\.net\.num_classes=5"),
    ("model.net.num_classes=0", r"model\.net\.num_classes=0"),
    ("model.net.num_classes=abc", r"model\.net\.num_classes='abc'"),
    ("model.net.dropout=2.0", r"model\.net\.dropout=2\.0"),
    ("model.net.num_res_blocks=0", r"model\.net\.num_res_blocks=0"),
    ("+model.net.num_head=3", r"model\.net\.num_head is not an argument of UNet"),
    ("model.lr_scheduler.warmup=abc", r"model\.lr_scheduler\.warmup='abc'"),
    ("model.lr_scheduler.warmup=2.0", r"warmup"),
    ("process.shift=0", r"shift"),
    ("process.shift=abc", r"shift must be a number > 0, got 'abc'"),
    ("sampler.steps=0", r"steps"),
    ("sampler.steps=abc", r"sampler\.steps='abc'"),
    ("callbacks.checkpoint.every_n_train_steps=-1", r"every_n_train_steps"),
    ("callbacks.nan_guard.max_consecutive_nonfinite=0", r"max_consecutive_nonfinite"),
    ("callbacks.ema.decay=abc", r"callbacks\.ema\.decay='abc'"),
    ("auto_resume=maybe", r"auto_resume"),
    ("auto_resume=1", r"auto_resume"),
    ("ckpt_path={tmp}/missing.ckpt", r"missing\.ckpt"),
    ("ckpt_path={text}", r"text\.ckpt"),
    ("ckpt_path={truncated}", r"truncated\.ckpt"),
    ("ckpt_path=123", r"ckpt_path"),
    ("ckpt_path={classifier}", r"classifier/checkpoints/last\.ckpt"),
    ("print_config=maybe", r"print_config"),
    ("hydra.run.dir={file}/run", r"a_file/run"),
    ("data=image_folder data.data_dir={tmp}/nowhere", r"nowhere"),
    ("data=image_folder data.data_dir={file}", r"a_file"),
]


@pytest.mark.parametrize(("override", "expected"), TRAIN, ids=[o for o, _ in TRAIN])
def test_train(world, tmp_path, capfd, override, expected):
    args = [*QUICK, f"hydra.run.dir={tmp_path}/run", *override.split()]
    if override.startswith("data=image_folder"):
        args += ["data.image_size=8", "data.channels=1", "model.net.num_classes=null"]
    check(*cli("train", fill(args, world, tmp_path), capfd), expected)


def test_train_sweep_with_a_bad_value_is_one_line(world, tmp_path, capfd):
    args = ["-m", *QUICK, "seed=1,abc", f"hydra.sweep.dir={tmp_path}/sweep"]
    check(*cli("train", args, capfd), r"seed='abc'")


def test_image_folder_with_fewer_classes_than_the_model(tmp_path, capfd):
    import numpy as np
    from PIL import Image

    for i, name in enumerate(["cat", "dog"] * 4):
        (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    args = [
        *QUICK,
        "data=image_folder",
        f"data.data_dir={tmp_path / 'images'}",
        "data.image_size=8",
        "data.channels=1",
        f"hydra.run.dir={tmp_path}/run",
    ]
    check(*cli("train", args, capfd), r"model\.net\.num_classes=10 .*2 classes")


def _hydra_files(run: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((run / ".hydra").glob("*.yaml"))}


@pytest.fixture
def finished_run(tmp_path, capfd) -> Path:
    run = tmp_path / "run"
    code, out = cli("train", [*QUICK, f"hydra.run.dir={run}"], capfd)
    assert code == 0, out[-3000:]
    return run


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], r"already holds a run"),  # a fresh run into a used folder
        (["ckpt_path={ckpt}"], r"already holds a run"),  # another run's checkpoint into a used folder
        (["auto_resume=true", "ckpt_path=RUN/checkpoints/last.ckpt"], r"nothing to train"),
        (["lock"], r"in use by another run"),
    ],
    ids=["fresh", "import", "finished", "busy"],
)
def test_a_refused_run_keeps_its_folder_records(world, finished_run, capfd, extra, expected):
    from diffusion_lab.run_folder import RunLock

    before = _hydra_files(finished_run)
    summary = (finished_run / "summary.json").read_text()
    args = [*QUICK, f"hydra.run.dir={finished_run}", "seed=7"]
    args += [a.replace("RUN", str(finished_run)) for a in fill(extra, world, finished_run) if a != "lock"]
    if "lock" in extra:
        with RunLock(finished_run):
            check(*cli("train", [*args, "auto_resume=true", "trainer.max_steps=4"], capfd), expected)
    else:
        check(*cli("train", args, capfd), expected)
    assert _hydra_files(finished_run) == before and "seed: 7" not in before["config.yaml"]
    assert (finished_run / "summary.json").read_text() == summary


# ------------------------------------------------------------------------------------------ sample
SAMPLE = [
    ("n=0", r"n must be >= 1"),
    ("n=-1", r"n must be >= 1"),
    ("n=abc", r"n must be an integer, got 'abc'"),
    ("n=1.5", r"n must be an integer, got 1\.5"),
    ("seed=abc", r"seed must be an integer"),
    ("seed=1.5", r"seed must be an integer"),
    ("batch_size=0", r"batch_size must be >= 1"),
    ("batch_size=abc", r"batch_size must be an integer"),
    ("guidance_scale=-1", r"guidance_scale must be >= 0"),
    ("guidance_scale=abc", r"guidance_scale must be a number"),
    ("guidance_scale=nan", r"guidance_scale must be a number"),
    ("guidance_scale=inf", r"guidance_scale must be a number"),
    ("guidance_rescale=abc", r"guidance_rescale"),
    ("guidance_rescale=-1", r"guidance_rescale"),
    ("guidance_interval=[1]", r"guidance_interval"),
    ("guidance_interval=abc", r"guidance_interval"),
    ("guidance_interval=[2,1]", r"guidance_interval"),
    ("guide_ckpt={tmp}/missing.ckpt", r"missing\.ckpt"),
    ("guide_ckpt={uncond}", r"guide_ckpt"),
    ("class_label=10", r"class_label=10 is out of range"),
    ("class_label=-1", r"class_label=-1 is out of range"),
    ("class_label=abc", r"class_label must be an integer"),
    ("class_label=1.5", r"class_label must be an integer"),
    ("class_label=true", r"class_label must be an integer"),
    ("prompt='a red square'", r"prompt given, but this model is not text-conditional"),
    ("prompt=[1,2]", r"prompt"),
    ("sampler.steps=0", r"steps"),
    ("sampler.steps=abc", r"steps"),
    ("sampler.steps=-3", r"steps"),
    ("nrow=abc", r"nrow"),
    ("nrow=-1", r"nrow"),
    ("nrow=0", r"nrow"),
    ("nrow=1.5", r"nrow"),
    ("device=tpu9", r"device='tpu9'"),
    ("ckpt={tmp}/missing.ckpt", r"missing\.ckpt"),
    ("ckpt={text}", r"text\.ckpt"),
    ("ckpt={truncated}", r"truncated\.ckpt"),
    ("ckpt={nan}", r"nan\.ckpt"),
    ("ckpt={classifier}", r"classifier/checkpoints/last\.ckpt"),
    ("ckpt={root}", r"world"),
    ("ckpt=123", r"123"),
    ("out={file}/out", r"a_file/out"),
]


@pytest.mark.parametrize(("override", "expected"), SAMPLE, ids=[o for o, _ in SAMPLE])
def test_sample(world, tmp_path, capfd, override, expected):
    args = ["ckpt={ckpt}", "n=2", "sampler.steps=2", "out={tmp}/s", override]
    if "ckpt=" in override and not override.startswith("guide"):
        args.remove("ckpt={ckpt}")
    check(*cli("sample", fill(args, world, tmp_path), capfd), expected)
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_sample_unconditional_given_a_class(world, tmp_path, capfd):
    args = fill(["ckpt={uncond}", "n=2", "sampler.steps=2", "out={tmp}/s", "class_label=1"], world, tmp_path)
    check(*cli("sample", args, capfd), r"class_label given, but this model is not class-conditional")


def test_sample_never_overwrites_samples(world, tmp_path, capfd):
    args = fill(["ckpt={ckpt}", "n=2", "sampler.steps=2", "out={tmp}/s"], world, tmp_path)
    code, out = cli("sample", args, capfd)
    assert code == 0, out[-3000:]
    before = (tmp_path / "s" / "samples.npz").read_bytes()
    check(*cli("sample", [*args, "seed=5"], capfd), r"out=.*/s already holds samples")
    assert (tmp_path / "s" / "samples.npz").read_bytes() == before


def test_sample_default_folder_is_never_overwritten(world, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(world["ckpt"].parent, run / "checkpoints")
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "n=2", "sampler.steps=2", "sampler=ddim"]
    for extra in ("class_label=1", "class_label=2"):
        code, out = cli("sample", [*args, extra], capfd)
        assert code == 0, out[-3000:]
    folders = sorted(p.name for p in (run / "samples_cli").iterdir())
    assert folders == ["ddim_2", "ddim_2_1"], folders
    labels = [json.loads((run / "samples_cli" / f / "sample.json").read_text()) for f in folders]
    assert [info["out"].rsplit("/", 1)[-1] for info in labels] == folders


# ------------------------------------------------------------------------------------------ evaluate
EVALUATE = [
    ("ckpt={tmp}/missing.ckpt", r"missing\.ckpt"),
    ("ckpt={text}", r"text\.ckpt"),
    ("ckpt={truncated}", r"truncated\.ckpt"),
    ("ckpt={classifier}", r"classifier/checkpoints/last\.ckpt"),
    ("ckpt={nan}", r"nan\.ckpt"),
    ("classifier_ckpt={tmp}/missing.ckpt", r"missing\.ckpt"),
    ("classifier_ckpt={ckpt}", r"class/checkpoints/last\.ckpt is not a classifier"),
    ("classifier_ckpt={text}", r"text\.ckpt"),
    ("classifier_ckpt=null", r"classifier_ckpt"),
    ("num_samples=1", r"num_samples must be >= 2"),
    ("num_samples=abc", r"num_samples"),
    ("num_samples=2.5", r"num_samples"),
    ("samplers=[nope]", r"nope"),
    ("samplers=[]", r"samplers must be a non-empty list"),
    ("steps=[0]", r"steps must be integers >= 1"),
    ("steps=[abc]", r"steps must be integers >= 1"),
    ("guidance_scales=[-1]", r"guidance_scales must be >= 0"),
    ("guidance_scales=[abc]", r"guidance_scales"),
    ("features=[nope]", r"nope"),
    ("metrics=[nope]", r"unknown metric\(s\) nope"),
    ("split=nope", r"unknown split 'nope'"),
    ("reference_split=test", r"reference_split must differ from split"),
    ("sigma_rels=[0.1]", r"phema|snapshot"),
    ("sigma_rels=abc", r"sigma_rels"),
    ("batch_size=0", r"batch_size"),
    ("batch_size=abc", r"batch_size"),
    ("seed=abc", r"seed"),
    ("device=tpu9", r"device='tpu9'"),
    ("num_real=0", r"num_real"),
    ("pr_k=0", r"pr_k"),
    ("kid_subsets=0", r"kid_subsets"),
    ("out={file}/out", r"a_file/out"),
    ("guide_ckpt={tmp}/missing.ckpt", r"missing\.ckpt"),
    ("sampler_options=abc", r"sampler_options"),
]


@pytest.mark.parametrize(("override", "expected"), EVALUATE, ids=[o for o, _ in EVALUATE])
def test_evaluate(world, tmp_path, capfd, override, expected):
    args = [
        "ckpt={uncond}" if override.startswith("sigma_rels=[") else "ckpt={ckpt}",
        "classifier_ckpt={classifier}",
        "samplers=[ddim]",
        "steps=[2]",
        "num_samples=4",
        "num_real=8",
        "kid_subsets=2",
        "kid_subset_size=2",
        "progress=false",
        "cache_dir={tmp}/cache",
        "out={tmp}/eval",
        override,
    ]
    key = override.split("=")[0]
    args = [a for a in args[:-1] if a.split("=")[0] != key] + [override]
    check(*cli("evaluate", fill(args, world, tmp_path), capfd), expected)


def test_evaluate_sigma_rel_out_of_range(world, tmp_path, capfd):
    args = ["ckpt={ckpt}", "features=[random]", "sigma_rels=[0.5]", "out={tmp}/eval", "progress=false"]
    check(*cli("evaluate", fill(args, world, tmp_path), capfd), r"sigma_rel")


# ------------------------------------------------------------------------------------------ phema
PHEMA = [
    ("ckpt_dir={tmp}/nowhere", r"nowhere"),
    ("ckpt_dir={file}", r"a_file"),
    ("ckpt_dir={root}/uncond/checkpoints", r"uncond/checkpoints"),
    ("sigma_rel=abc", r"sigma_rel='abc'"),
    ("sigma_rel=[abc]", r"sigma_rel"),
    ("sigma_rel=[]", r"sigma_rel must be a non-empty list"),
    ("sigma_rel=0.5", r"sigma_rel"),
    ("sigma_rel=-1", r"sigma_rel"),
    ("sigma_rel=0", r"sigma_rel"),
    ("step=abc", r"step"),
    ("step=999", r"step"),
    ("in_sigma_rel=[abc]", r"in_sigma_rel"),
    ("in_sigma_rel=[0.3]", r"in_sigma_rel|0\.3"),
    ("template={tmp}/missing.ckpt", r"missing\.ckpt"),
    ("template={text}", r"text\.ckpt"),
    ("out={file}/out", r"a_file/out"),
]


@pytest.mark.parametrize(("override", "expected"), PHEMA, ids=[o for o, _ in PHEMA])
def test_phema(world, tmp_path, capfd, override, expected):
    args = ["ckpt_dir={root}/class/checkpoints", f"out={tmp_path}/out", override]
    key = override.split("=")[0]
    args = [a for a in args[:-1] if a.split("=")[0] != key] + [override]
    check(*cli("phema", fill(args, world, tmp_path), capfd), expected)


# ------------------------------------------------------------------------------------------ report
def _run_folder(
    root: Path, name: str, *, summary: str | None = '{"steps": 2}', overrides: str = "- seed=0\n"
):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(overrides)
    if summary is not None:
        (run / "summary.json").write_text(summary)
    return run


REPORT = {
    "truncated_summary": (lambda r: _run_folder(r, "0", summary='{"steps": 7'), r"0/summary\.json"),
    "summary_is_a_list": (lambda r: _run_folder(r, "0", summary="[1, 2]"), r"0/summary\.json"),
    "summary_is_a_string": (lambda r: _run_folder(r, "0", summary='"done"'), r"0/summary\.json"),
    "summary_is_null": (lambda r: _run_folder(r, "0", summary="null"), r"0/summary\.json"),
    "summary_binary": (
        lambda r: (_run_folder(r, "0", summary=None) / "summary.json").write_bytes(b"\xff\xfe{"),
        r"0/summary\.json",
    ),
    "overrides_not_yaml": (lambda r: _run_folder(r, "0", overrides="- [unclosed\n"), r"overrides\.yaml"),
    "overrides_a_mapping": (lambda r: _run_folder(r, "0", overrides="seed: 0\n"), r"overrides\.yaml"),
    "overrides_a_number": (lambda r: _run_folder(r, "0", overrides="3\n"), r"overrides\.yaml"),
    "eval_json_malformed": (
        lambda r: (
            (r / "e").mkdir(),
            (r / "e" / "metrics.csv").write_text("sampler,steps,nfe\nddim,2,2\n"),
            (r / "e" / "eval.json").write_text("{"),
        ),
        r"eval\.json",
    ),
    "empty_folder": (lambda r: None, r"no runs under"),
    "not_a_folder": (lambda r: (r / "x.txt").write_text(""), r"not a folder"),
}


@pytest.mark.parametrize("case", sorted(REPORT))
def test_report(tmp_path, capfd, case):
    build, expected = REPORT[case]
    root = tmp_path / "sweep"
    root.mkdir()
    build(root)
    target = root / "x.txt" if case == "not_a_folder" else root
    check(*cli("report", [str(target)], capfd), expected)


def test_report_unwritable_out(tmp_path, capfd):
    _run_folder(tmp_path / "sweep", "0")
    (tmp_path / "a_file").write_text("")
    check(
        *cli("report", [str(tmp_path / "sweep"), "--out", str(tmp_path / "a_file" / "r")], capfd), r"a_file"
    )


# ------------------------------------------------------------------------------------------ the right behaviour
def test_auto_resume_completes_a_run_stopped_during_its_end_of_run_work(tmp_path, capfd):
    """A stop (SIGTERM, kill -9) after the final last.ckpt but before summary.json: auto_resume does the end of the
    run (final grid, summary) instead of refusing with "nothing to train"; a second call has nothing to do."""
    run = tmp_path / "run"
    args = [*QUICK[:-2], "callbacks.image_logger.num_samples=4", "print_config=false", f"hydra.run.dir={run}"]
    code, out = cli("train", args, capfd)
    assert code == 0, out[-3000:]
    first = json.loads((run / "summary.json").read_text())
    grids = [Path(g) for g in first["sample_grids"]]
    for path in [run / "summary.json", *grids]:  # what the stopped run had not written yet
        path.unlink()
    code, out = cli("train", [*args, "auto_resume=true"], capfd)
    assert code == 0, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert all(g.is_file() for g in grids), summary
    code, out = cli("train", [*args, "auto_resume=true"], capfd)
    assert code == 0 and "holds a finished run (step 2): nothing to do" in out, out[-3000:]


def test_auto_resume_ignores_post_hoc_ema_checkpoints(world, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(world["ckpt"].parents[1], run)
    code, out = cli("phema", [f"ckpt_dir={run / 'checkpoints'}", "sigma_rel=[0.05]"], capfd)
    assert code == 0 and list((run / "checkpoints").glob("phema-*.ckpt")), out[-3000:]
    (run / ".lock").unlink(missing_ok=True)
    args = [*QUICK, "callbacks=[default,phema]", "callbacks.phema.sigma_rels=[0.05,0.10]", "auto_resume=true"]
    code, out = cli("train", [*args, "trainer.max_steps=3", f"hydra.run.dir={run}"], capfd)
    assert code == 0, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("last.ckpt")
    assert not (run / "csv" / "metrics_discarded.csv").exists()


def test_a_resumed_run_counts_non_finite_steps_afresh():
    from diffusion_lab.callbacks.nan_guard import NonFiniteGuard

    guard = NonFiniteGuard(max_consecutive_nonfinite=3)
    guard.load_state_dict({"skipped": 7, "consecutive": 3, "last_good_step": 40})
    assert (guard.skipped, guard.consecutive, guard.last_good_step) == (7, 0, 40)


def test_the_advice_after_a_blow_up_names_a_checkpoint_with_finite_weights(world, tmp_path):
    from diffusion_lab.callbacks.nan_guard import finite_checkpoint_advice

    shutil.copy(world["nan"], tmp_path / "last.ckpt")
    assert finite_checkpoint_advice(str(tmp_path)).startswith("No checkpoint holds finite weights")
    shutil.copy(world["ckpt"], tmp_path / "step000002.ckpt")
    advice = finite_checkpoint_advice(str(tmp_path))
    assert f"Resume from {tmp_path / 'step000002.ckpt'} (step 2" in advice and "last.ckpt" not in advice


def test_two_quick_ctrl_c_exit_130(tmp_path):
    """The second Ctrl-C stops at once (no waiting for the step, no checkpoint), with the exit code of SIGINT."""
    import os
    import signal

    import lightning as L

    from diffusion_lab.callbacks.preemption import Interrupted
    from diffusion_lab.train import train

    from conftest import compose

    class CtrlCTwice(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        train(compose("train", [*QUICK, "trainer.max_steps=4"], tmp_path), extra_callbacks=[CtrlCTwice()])
    assert e.value.code == 130 and "second SIGINT" in str(e.value)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_prompt_words_outside_the_vocabulary_are_named(caplog):
    from diffusion_lab.data.captions import caption_words
    from diffusion_lab.nets.text import TransformerTextEncoder, WordTokenizer
    from diffusion_lab.sample import warn_unknown_words

    encoder = TransformerTextEncoder(
        tokenizer=WordTokenizer(vocabulary=caption_words("shapes"), max_length=16),
        dim=8,
        depth=1,
        num_heads=2,
    )
    assert warn_unknown_words(encoder, "a red square") == [] and not caplog.records
    assert warn_unknown_words(encoder, "a xylophone and a red zebra") == ["xylophone", "zebra"]
    assert "'xylophone', 'zebra' are not in the text encoder's vocabulary" in caplog.text


def test_report_leaves_failed_jobs_out_of_seed_groups(tmp_path):
    from diffusion_lab.report import report

    for i in range(3):
        _run_folder(tmp_path, str(i), summary=None if i == 2 else json.dumps({"steps": 2, "fid": 1.0 + i}),
                    overrides=f"- seed={i}\n")  # fmt: skip
    [row] = report([tmp_path])["seed_rows"]
    assert row["n"] == 2 and row["fid_mean"] == 1.5
