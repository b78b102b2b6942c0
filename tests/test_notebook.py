"""The walkthrough notebook runs top to bottom (with a short training) and is committed without outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from run_if import RunIf

DEV = "pip install -e '.[dev]'"

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "01_walkthrough.ipynb"
STEPS = 30  # training steps in the test (the notebook's default is 700, the full quickstart)
FIGURES = 6  # data, noising, schedules, loss curve, samplers, guidance strip
RESULTS_TAG = "WALKTHROUGH_RESULTS "

# appended to an in-memory copy of the notebook: hands the notebook's own numbers to the test
RESULTS_CELL = f"""
import json
print({RESULTS_TAG!r} + json.dumps({{
    "var0": var0,
    "noising_check": noising_check,
    "losses": losses,
    "trained_here": trained_here,
    "sample_range": [min(float(v.min()) for v in sampler_images.values()),
                     max(float(v.max()) for v in sampler_images.values())],
    "guidance_change": {{str(w): float((guidance_images[w] - guidance_images[0.0]).abs().mean())
                        for w in guidance_images}},
}}))
"""


@RunIf("nbformat", reason=DEV)
def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 8
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"notebook cells {dirty} carry outputs or execution counts: strip them before committing"
    )


def _kernel_manager(tmp_path: Path):
    """A kernel running this very interpreter (whatever `python3` kernelspec is installed, if any)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "walkthrough-test")
    spec = json.loads((kernels / "walkthrough-test" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return KernelManager(
        kernel_name="walkthrough-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )


def _linear_alpha_bar() -> np.ndarray:
    """Closed form of the linear schedule (Ho et al. 2020): cumprod(1 - linspace(1e-4, 0.02, 1000))."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


@pytest.mark.slow
@RunIf("nbformat", "ipykernel", "nbclient", reason=DEV)
def test_walkthrough_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    work = tmp_path / "work"
    work.mkdir()
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WALKTHROUGH_STEPS", str(STEPS))
    monkeypatch.setenv("WALKTHROUGH_OUT", str(run_dir))
    monkeypatch.delenv("WALKTHROUGH_CKPT", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(RESULTS_CELL))
    client = NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) == FIGURES
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    results = json.loads(text.split(RESULTS_TAG, 1)[1].splitlines()[0])

    # forward noising: the empirical mean / std of x_t over the training set follow the closed form,
    # with alpha-bar computed here independently of diffusion_lab; the std grows towards 1 with t
    abar = _linear_alpha_bar()
    rows = results["noising_check"]
    assert [r["t"] for r in rows] == [0, 50, 100, 250, 500, 750, 999]
    for r in rows:
        assert r["abar"] == pytest.approx(abar[r["t"]], rel=1e-9)
        expected_std = np.sqrt(abar[r["t"]] * results["var0"] + 1 - abar[r["t"]])
        assert r["std_emp"] == pytest.approx(expected_std, abs=5e-3)
        assert r["mean_emp"] == pytest.approx(r["mean_pred"], abs=7e-3)
    stds = [r["std_emp"] for r in rows[:5]]  # t <= 500; later ones are all ~1 within sampling error
    assert stds == sorted(stds) and stds[0] < 0.8 and rows[-1]["std_emp"] == pytest.approx(1.0, abs=5e-3)

    # the short training really trained: a run folder with a checkpoint, and the loss came down
    assert results["trained_here"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    losses = [v for _, v in results["losses"]]
    assert len(losses) >= 10
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5])

    # samplers return images in [-1, 1]; guidance moves the samples away from the unconditional ones (w=0),
    # the further the larger w (after a short training the label's effect is small but already monotone)
    lo, hi = results["sample_range"]
    assert -1.0 <= lo < hi <= 1.0
    change = results["guidance_change"]
    assert change["0.0"] == 0.0
    assert 0.0 < change["1.0"] < change["3.0"] < change["5.0"], change
