"""Report entry point: `python -m diffusion_lab.report DIR [DIR ...] [--out OUT]` -> one table + plots across runs.

DIR is a Hydra multirun folder (`multirun/<date>/`), a training run folder, or an evaluate folder; run folders
are found below it (a `.hydra/overrides.yaml` or a `summary.json`), evaluate folders by their `metrics.csv`
(one row per sampler x steps x guidance). Each run is named by the overrides that set it apart from the other
runs (the ones all runs share and `hydra.*` / `paths.*` are left out). Writes into OUT (default: DIR):

  report.md            the runs table (summary.json's numbers per run; values shared by every run listed once
                       above it), mean +- std over seeds when runs differ only by `seed`, and the evaluations
  report.csv           the same runs table, with one column per distinguishing override key (all columns)
  report_seeds.csv     per configuration (runs that differ only by `seed`): n, mean, std and 95% t-interval
                       (`_lo`, `_hi`) of each number
  report_tests.csv     every pair of configurations, per number: Welch's t on the per-seed values, its p and
                       Holm's p over the pairs of that number; significant = Holm's p < 0.05
  final_metrics_seeds.png  one bar per configuration: mean over seeds, 95% t-interval as error bars, seeds as dots
  final_grids.png      a montage of each run's last sample grid, labelled by run
  report_eval.csv      every evaluate row, tagged with its run (only when evaluate folders were found)
  loss_curves.png      training (and validation) loss against step from each run's csv/metrics.csv
  final_metrics.png    one bar chart per summary metric that differs between runs
  metrics_vs_nfe.png   evaluate metrics against NFE: colour = run, marker = sampler (with evaluations)
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffusion_lab.metrics.intervals import LEVEL, holm, t_interval, welch_t_test
from diffusion_lab.tables import (
    EVAL_INFO,
    EVAL_KEYS,
    colors,
    columns_of,
    figure,
    fmt,
    interval_cells,
    is_num,
    legend_outside,
    markdown_table,
    md_cell,
    plot_metrics_vs_nfe,
    write_csv,
)

log = logging.getLogger(__name__)

EXCLUDED_KEY_PREFIXES = ("hydra", "paths")  # where a run writes is no part of what it is
SKIP_DIRS = {"checkpoints", "samples", "wandb", "tensorboard", "csv", "features", "__pycache__"}
SUMMARY_FIRST = ("final_train_loss", "final_val_loss", "class_accuracy")
NOT_BARS = {"steps", "epochs"}  # bookkeeping, not results
LOSS_COLUMNS = ("train/loss", "val/loss")


class ReportError(ValueError):
    """Nothing to report, or an input that is not what it should be (one line)."""


@dataclass
class Run:
    """One training run folder."""

    path: Path
    overrides: list[str]
    summary: dict[str, Any] | None
    label: str = ""  # its distinguishing overrides (set once every run is known)
    varying: dict[str, str] = field(default_factory=dict)  # distinguishing override key -> value


@dataclass
class Evaluation:
    """One evaluate output folder (`metrics.csv`), with the run it evaluated when that run is in the report."""

    path: Path
    rows: list[dict[str, Any]]
    run: Run | None = None
    label: str = ""


# ------------------------------------------------------------------------------------------ discovery
def _natural_key(path: Path) -> list:
    """Sort `2_x` before `10_x` (Hydra job numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run(d: Path) -> bool:
    return (d / ".hydra" / "overrides.yaml").is_file() or (d / "summary.json").is_file()


def _is_eval(d: Path) -> bool:
    f = d / "metrics.csv"
    if not f.is_file():
        return False
    with open(f, newline="") as fh:
        header = next(csv.reader(fh), [])
    return all(k in header for k in ("sampler", "nfe"))


def find_folders(root: Path) -> tuple[list[Path], list[Path]]:
    """(run folders, evaluate folders) at or below `root`."""
    runs, evals = [], []
    for d, subdirs, _ in os.walk(root):
        d = Path(d)
        subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS and not s.startswith("."))
        if _is_run(d):
            runs.append(d)
        if _is_eval(d):
            evals.append(d)
    return sorted(runs, key=_natural_key), sorted(evals, key=_natural_key)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_run(path: Path) -> Run:
    overrides_file = path / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    except (yaml.YAMLError, ValueError) as e:
        raise ReportError(
            f"{overrides_file} is not valid YAML ({_one_line(e)}): restore it or remove it"
        ) from e
    if not isinstance(overrides or [], list):
        raise ReportError(
            f"{overrides_file} is not a list of overrides (it holds a {type(overrides).__name__}): restore it"
            " or remove it"
        )
    summary_file = path / "summary.json"
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    except ValueError as e:  # truncated (a writer killed mid-write before train.py wrote it atomically)
        raise ReportError(
            f"{summary_file} is not valid JSON ({_one_line(e)}): truncated? rerun that run or remove it"
        ) from e
    if summary_file.is_file() and not isinstance(summary, dict):
        raise ReportError(
            f"{summary_file} is not a run summary (a JSON object; it holds a {type(summary).__name__}): rerun"
            " that run or remove it"
        )
    return Run(path=path, overrides=[str(o) for o in overrides or []], summary=summary)


def _number(value: str) -> Any:
    """A CSV cell as int / float when it is one ('' -> None)."""
    if value is None or value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def read_eval(path: Path) -> Evaluation:
    with open(path / "metrics.csv", newline="") as fh:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    return Evaluation(path=path, rows=rows)


# ------------------------------------------------------------------------------------------ naming
def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _excluded(key: str) -> bool:
    return any(key == p or key.startswith((p + ".", p + "/")) for p in EXCLUDED_KEY_PREFIXES)


def name_runs(runs: list[Run], root: Path | None) -> None:
    """Label each run by the overrides not shared by all runs (falls back to its folder name)."""
    parsed = [{k: v for k, v in map(_split_override, r.overrides) if not _excluded(k)} for r in runs]
    keys: list[str] = []
    for p in parsed:
        keys += [k for k in p if k not in keys]
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1] if len(runs) > 1 else []
    for run, p in zip(runs, parsed):
        run.varying = {k: p.get(k, "") for k in varying}
        run.label = ", ".join(f"{k}={p[k]}" for k in varying if k in p) or _folder_name(run.path, root)
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:  # identical overrides (a repeated run): the folder tells them apart
        if seen[run.label] > 1:
            run.label = f"{run.label} ({_folder_name(run.path, root)})"


def _folder_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            rel = path.resolve().relative_to(root.resolve())
            if str(rel) != ".":
                return str(rel)
        except ValueError:
            pass
    return path.name


def attach_evaluations(evals: list[Evaluation], runs: list[Run], root: Path | None) -> None:
    """Give each evaluation the run that holds it (`<run>/eval`) or whose checkpoint it scored (eval.json)."""
    by_path = {r.path.resolve(): r for r in runs}
    for ev in evals:
        candidates = [ev.path.resolve(), *ev.path.resolve().parents]
        info = ev.path / "eval.json"
        if info.is_file():
            try:
                ckpt = json.loads(info.read_text()).get("ckpt")
            except (ValueError, AttributeError) as e:
                raise ReportError(f"{info} is not an evaluate record ({_one_line(e)}): remove it") from e
            if ckpt:  # <run>/checkpoints/x.ckpt
                candidates.insert(0, Path(ckpt).resolve().parent.parent)
        ev.run = next((by_path[c] for c in candidates if c in by_path), None)
    for ev in evals:
        siblings = [e for e in evals if e.run is ev.run]
        if ev.run is None:
            ev.label = _folder_name(ev.path, root)
        elif len(siblings) > 1:
            ev.label = f"{ev.run.label} [{ev.path.name}]"
        else:
            ev.label = ev.run.label


# ------------------------------------------------------------------------------------------ tables
def summary_columns(runs: list[Run]) -> list[str]:
    """The numeric scalar entries of summary.json that some run has a value for."""
    cols: list[str] = []
    for run in runs:
        for k, v in (run.summary or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in cols:
                cols.append(k)
        for k, v in (run.summary or {}).items():  # a null metric in one run may be a number in another
            if v is None and k not in cols and any(is_num((r.summary or {}).get(k)) for r in runs):
                cols.append(k)
    first = [c for c in SUMMARY_FIRST if c in cols]
    return first + [c for c in cols if c not in first]


def run_rows(runs: list[Run], columns: list[str], root: Path | None) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run": run.label,
            "folder": _folder_name(run.path, root),
            "status": "done" if run.summary is not None else "no summary.json",
        }
        row.update(run.varying)
        row.update({c: (run.summary or {}).get(c) for c in columns})
        rows.append(row)
    return rows


def eval_rows(evals: list[Evaluation]) -> list[dict[str, Any]]:
    return [{"run": ev.label, **row} for ev in evals for row in ev.rows]


def write_markdown(
    path: Path,
    *,
    sources: list[Path],
    runs: list[Run],
    rows: list[dict[str, Any]],
    columns: list[str],
    erows: list[dict[str, Any]],
    plots: list[Path],
    srows: Sequence[dict[str, Any]] = (),
    trows: Sequence[dict[str, Any]] = (),
    esrows: Sequence[dict[str, Any]] = (),
) -> None:
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)] if runs else []
    constant = constant_columns(rows, columns)
    lines = ["# Report", "", "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    if runs:
        lines += [f"{len(runs)} run(s)."]
        if common and len(runs) > 1:
            lines += ["Overrides shared by every run: " + " ".join(f"`{o}`" for o in common)]
        if constant:
            lines += [
                "",
                "Same in every run: " + ", ".join(f"{k} = {md_cell(v)}" for k, v in constant.items()),
            ]
        lines += ["", "## Runs", ""]
        lines += markdown_table(rows, ["run", *(c for c in columns if c not in constant), "folder"])
        lines += [
            "",
            "Values are each run's `summary.json` (`final_train_loss` is the last step's loss). Losses of "
            "different prediction types or loss weightings are on different scales: compare quality metrics.",
        ]
    if srows:
        varying = [c for c in columns if c not in constant and any(f"{c}_mean" in r for r in srows)]
        table = [
            {
                "run": r["run"],
                "seeds": r["n"],
                **{c: _mean_std(r, c) for c in varying},
                **{f"{c} 95%": _interval(r, c) for c in varying},
            }
            for r in srows
        ]
        lines += ["", "## Over seeds (mean ± std, 95% interval)", ""]
        heads = [h for c in varying for h in (c, f"{c} 95%")]
        lines += markdown_table(table, ["run", "seeds", *heads])
        lines += [
            "",
            "Runs that differ only by `seed`, grouped; std is the sample standard deviation, the interval the "
            "Student-t 95% interval of the mean over seeds (wide with 2-3 seeds: that is the honest width).",
        ]
        lines += significance_lines([t for t in trows if "sampler" not in t])
    if esrows:
        lines += ["", "## Evaluations over seeds (mean [95% t-interval])", ""]
        lines += markdown_table(*interval_cells(list(esrows), columns_of(esrows)))
        lines += significance_lines([t for t in trows if "sampler" in t])
    if erows:
        lines += ["", "## Evaluations", ""] + markdown_table(*interval_cells(erows, columns_of(erows)))
        if any(k.endswith("_lo") for r in erows for k in r):
            lines += ["", "[lo, hi]: 95% bootstrap interval over each evaluation's generated samples."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")


def constant_columns(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """{column: value} of the summary columns with one and the same value in every run (with 2+ runs)."""
    if len(rows) < 2:
        return {}
    out = {}
    for c in columns:
        values = [r.get(c) for r in rows]
        if values[0] is not None and all(v == values[0] for v in values):
            out[c] = values[0]
    return out


def seed_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs that differ only by `seed`, by the label of what they share (their other distinguishing overrides);
    only groups of 2+ runs."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.summary is None:  # a failed (or unfinished) job has no figures to count
            continue
        rest = {k: v for k, v in run.varying.items() if k != "seed"}
        label = ", ".join(f"{k}={v}" for k, v in rest.items() if v != "") or "all runs"
        groups.setdefault(label, []).append(run)
    return {label: members for label, members in groups.items() if len(members) > 1}


def seed_values(members: list[Run], column: str) -> list[float]:
    return [float(v) for v in ((m.summary or {}).get(column) for m in members) if is_num(v)]


def seed_rows(groups: dict[str, list[Run]], columns: list[str]) -> list[dict[str, Any]]:
    """One row per seed group: n, and mean / std (sample std, ddof 1) / 95% t-interval (`_lo`, `_hi`) of each
    summary number."""
    rows = []
    for label, members in groups.items():
        row: dict[str, Any] = {"run": label, "n": len(members)}
        for c in columns:
            values = [float(v) for v in ((m.summary or {}).get(c) for m in members) if is_num(v)]
            if len(values) >= 2:
                mean = sum(values) / len(values)
                row[f"{c}_mean"] = mean
                row[f"{c}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                row[f"{c}_lo"], row[f"{c}_hi"] = t_interval(values, level=LEVEL)
        rows.append(row)
    return rows


def seed_tests(
    groups: dict[str, list[Run]], columns: list[str], *, alpha: float = 0.05
) -> list[dict[str, Any]]:
    """Every pair of seed groups, per summary number with 2+ values in both: Welch's t-test on the per-seed values
    (two-sided), Holm's adjustment over the pairs of that number, significant = Holm's p < alpha."""
    values = {label: {c: seed_values(members, c) for c in columns} for label, members in groups.items()}
    return pairwise_welch(values, [c for c in columns if c not in NOT_BARS], alpha=alpha)


def pairwise_welch(
    values: dict[str, dict[str, list[float]]], metrics: list[str], *, alpha: float = 0.05, **keys: Any
) -> list[dict[str, Any]]:
    """Welch's t between every pair of groups ({group: {metric: per-seed values}}) per metric with 2+ values in
    both; Holm over the pairs of each metric. `keys` (e.g. the evaluate cell) are copied into every row."""
    rows = []
    labels = list(values)
    for c in metrics:
        tests = []
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                va, vb = values[a].get(c, []), values[b].get(c, [])
                if len(va) >= 2 and len(vb) >= 2:
                    t, df, p = welch_t_test(va, vb)
                    diff = sum(va) / len(va) - sum(vb) / len(vb)
                    tests.append(
                        {**keys, "metric": c, "a": a, "b": b, "diff": diff, "t": t, "df": df, "p": p}
                    )
        for test, p_holm in zip(tests, holm([t["p"] for t in tests]) if tests else []):
            test["p_holm"], test["significant"] = p_holm, p_holm < alpha
        rows += tests
    return rows


def eval_seed_rows(
    evals: list[Evaluation], groups: dict[str, list[Run]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Evaluations of runs that differ only by seed, per (sampler, steps, guidance) cell: mean / std / 95%
    t-interval (`_lo`, `_hi`) of each metric over seeds, and Welch + Holm between the groups at each cell."""
    group_of = {id(run): label for label, members in groups.items() for run in members}
    cells: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for ev in evals:
        label = group_of.get(id(ev.run)) if ev.run is not None else None
        for row in ev.rows if label is not None else []:
            if is_num(row.get("nfe")) and row["nfe"] > 0:
                key = (row["sampler"], row["steps"], row.get("guidance_scale"))
                cells.setdefault(key, {}).setdefault(label, []).append(row)
    skip = {"run", *EVAL_KEYS, *EVAL_INFO}
    rows, tests = [], []
    for (sampler, steps, guidance), by_group in cells.items():
        metrics = [
            c
            for c in columns_of([r for rs in by_group.values() for r in rs], skip)
            if not c.endswith(("_std", "_lo", "_hi"))
        ]
        values = {
            label: {c: [float(r[c]) for r in rs if is_num(r.get(c))] for c in metrics}
            for label, rs in by_group.items()
        }
        cell = {"sampler": sampler, "steps": steps, "guidance_scale": guidance}
        for label, rs in by_group.items():
            row = {"run": label, **cell, "nfe": rs[0].get("nfe"), "seeds": len(rs)}
            for c, v in values[label].items():
                if len(v) >= 2:
                    mean = sum(v) / len(v)
                    row[c], row[f"{c}_std"] = mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
                    row[f"{c}_lo"], row[f"{c}_hi"] = t_interval(v, level=LEVEL)
            rows.append(row)
        tests += pairwise_welch(values, metrics, **cell)
    return rows, tests


def significance_lines(trows: Sequence[dict[str, Any]]) -> list[str]:
    """The markdown verdict: which pairs of configurations differ beyond chance, and by which test."""
    if not trows:
        return []
    lines = [
        "",
        "### Differences beyond chance",
        "",
        "Welch's t-test (two-sided) on the per-seed values of each pair of configurations; p-values adjusted by "
        "Holm over the pairs of each number (not across numbers: with many numbers, expect some false alarms); "
        "significant = adjusted p < 0.05. With 2-3 seeds only large, consistent gaps pass: "
        "'not significant' means 'not shown', not 'equal'. All pairs are in report_tests.csv.",
        "",
    ]
    hits = [r for r in trows if r["significant"]]
    if not hits:
        return [*lines, "No pair differs beyond chance."]
    table = [{**r, "diff": r["diff"], "p": r["p"], "p_holm": r["p_holm"]} for r in hits]
    cell = [k for k in ("sampler", "steps", "guidance_scale") if k in hits[0]]
    return lines + markdown_table(table, [*cell, "metric", "a", "b", "diff", "t", "df", "p", "p_holm"])


def _mean_std(row: dict[str, Any], column: str) -> str:
    if f"{column}_mean" not in row:
        return ""
    return f"{fmt(row[f'{column}_mean'])} ± {fmt(row[f'{column}_std'])}"


def _interval(row: dict[str, Any], column: str) -> str:
    if f"{column}_lo" not in row:
        return ""
    return f"[{fmt(row[f'{column}_lo'])}, {fmt(row[f'{column}_hi'])}]"


def final_grid(run: Run) -> Path | None:
    """The run's last sample grid: the summary's last `sample_grids` entry, else the newest samples/*.png."""
    listed = [Path(p) for p in (run.summary or {}).get("sample_grids") or []]
    for path in reversed(listed):
        for candidate in (path, run.path / "samples" / path.name):  # moved folders: look beside the run
            if candidate.is_file():
                return candidate
    found = sorted((run.path / "samples").glob("step_*.png"))
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------ plots
def read_curves(run: Run) -> dict[str, list[tuple[int, float]]]:
    """{column: [(step, value), ...]} for the loss columns of the run's CSV logs (last value per step wins)."""
    curves: dict[str, dict[int, float]] = {}
    for f in sorted(run.path.glob("csv/**/metrics.csv")):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                step = _number(row.get("step"))
                for col in LOSS_COLUMNS:
                    value = _number(row.get(col))
                    if isinstance(step, int) and is_num(value):
                        curves.setdefault(col, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in curves.items()}


def _smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha**i))
    return out


def plot_loss_curves(runs: list[Run], path: Path) -> Path | None:
    curves = {run.label: read_curves(run) for run in runs}
    columns = [c for c in LOSS_COLUMNS if any(c in cv for cv in curves.values())]
    if not columns:
        return None
    fig = figure(7.5 + 0.05 * max(len(r.label) for r in runs), 3.6 * len(columns))
    axes = fig.subplots(len(columns), 1, squeeze=False).ravel()
    palette = colors(len(runs))
    for ax, col in zip(axes, columns):
        for color, run in zip(palette, runs):
            pts = curves[run.label].get(col)
            if not pts:
                continue
            steps, values = zip(*pts)
            if smoothed := (col == "train/loss" and len(values) > 20):  # raw (faint) + smoothed
                ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(steps, _smooth(list(values), 0.9), color=color, label=run.label, linewidth=1.6)
            else:
                ax.plot(steps, values, color=color, label=run.label, marker="o" if len(values) < 20 else None)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(col)
        ax.set_title(col + (" (EMA 0.9 smoothed; raw faint)" if smoothed else ""), fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        legend_outside(ax)
    fig.savefig(path, dpi=110)
    return path


def plot_final_metrics(runs: list[Run], columns: list[str], path: Path) -> Path | None:
    """One horizontal bar chart per summary metric whose value differs between runs (all of them for one run)."""
    metrics = []
    for c in columns:
        values = [(run.summary or {}).get(c) for run in runs]
        if c in NOT_BARS or not any(is_num(v) for v in values):
            continue
        if len(runs) > 1 and len({v for v in values if is_num(v)}) < 2:
            continue  # the same for every run: nothing to compare
        metrics.append(c)
    if not metrics:
        return None
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    label_width = max(len(r.label) for r in runs)
    fig = figure(max(9.0, ncols * (2.6 + 0.065 * label_width)), nrows * (1.0 + 0.42 * len(runs)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    palette = colors(len(runs))
    y = list(range(len(runs)))
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        values = [(run.summary or {}).get(metric) for run in runs]
        nums = [float(v) if is_num(v) else 0.0 for v in values]
        ax.barh(y, nums, color=palette)
        for yi, v in zip(y, values):
            ax.text(
                (v if is_num(v) else 0.0),
                yi,
                " " + fmt(v) if is_num(v) else " n/a",
                va="center",
                fontsize="x-small",
            )
        ax.set_yticks(y, [r.label for r in runs] if i % ncols == 0 else [""] * len(runs), fontsize="small")
        ax.invert_yaxis()  # first run on top, as in the table
        ax.set_title(metric, fontsize="medium")
        ax.margins(x=0.25)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return path


def plot_seed_metrics(groups: dict[str, list[Run]], srows: list[dict[str, Any]], path: Path) -> Path | None:
    """One horizontal bar chart per summary number: a bar per seed group at its mean, the 95% t-interval as
    error bars and each seed's value as a dot."""
    metrics = [c[: -len("_mean")] for c in columns_of(srows) if c.endswith("_mean")]
    metrics = [m for m in metrics if m not in NOT_BARS]
    if not metrics:
        return None
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    label_width = max(len(r["run"]) for r in srows)
    fig = figure(max(9.0, ncols * (2.6 + 0.065 * label_width)), nrows * (1.0 + 0.42 * len(srows)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    palette = colors(len(srows))
    y = list(range(len(srows)))
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        means = [r.get(f"{metric}_mean", math.nan) for r in srows]
        err = [
            [m - r.get(f"{metric}_lo", m) for m, r in zip(means, srows)],
            [r.get(f"{metric}_hi", m) - m for m, r in zip(means, srows)],
        ]
        ax.barh(y, [0.0 if math.isnan(m) else m for m in means], color=palette, xerr=err, capsize=3)
        for yi, r in zip(y, srows):
            values = seed_values(groups[r["run"]], metric)
            ax.plot(values, [yi] * len(values), "k.", markersize=4)
        ax.set_yticks(y, [r["run"] for r in srows] if i % ncols == 0 else [""] * len(srows), fontsize="small")
        ax.invert_yaxis()
        ax.set_title(f"{metric} (mean, 95% t-interval)", fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return path


def plot_final_grids(runs: list[Run], path: Path) -> Path | None:
    """A montage of each run's final sample grid (one panel per run, titled by its label)."""
    from PIL import Image

    grids = [(run.label, final_grid(run)) for run in runs]
    grids = [(label, g) for label, g in grids if g is not None]
    if not grids:
        return None
    ncols = min(4, len(grids))
    nrows = math.ceil(len(grids) / ncols)
    fig = figure(3.2 * ncols, 3.5 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, grid) in zip(axes, grids):
        with Image.open(grid) as im:
            ax.imshow(im.convert("RGB"), interpolation="nearest")
        ax.set_title(label, fontsize="x-small", wrap=True)
        ax.axis("off")
    for ax in axes[len(grids) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------ the report
def gather_folders(sources: list[Path]) -> tuple[list[Path], list[Path]]:
    """(run folders, evaluate folders) below `sources`, each once; ReportError when there are none."""
    if not sources:
        raise ReportError("give at least one folder: a multirun folder, run folders or evaluate folders")
    runs_paths: list[Path] = []
    eval_paths: list[Path] = []
    for src in sources:
        if not src.is_dir():
            raise ReportError(f"not a folder: {src}")
        r, e = find_folders(src)
        runs_paths += [p for p in r if p not in runs_paths]
        eval_paths += [p for p in e if p not in eval_paths]
    if not runs_paths and not eval_paths:
        raise ReportError(
            f"no runs under {', '.join(map(str, sources))}: expected run folders (with .hydra/overrides.yaml or "
            "summary.json, as diffusion_lab.train writes) or evaluate folders (metrics.csv)"
        )
    return runs_paths, eval_paths


def report(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Gather runs and evaluations below `dirs`, write the tables and plots into `out`; return what was written."""
    sources = [Path(d) for d in dirs]
    runs_paths, eval_paths = gather_folders(sources)
    root = sources[0] if len(sources) == 1 else _common_root(sources)
    out_dir = Path(out) if out is not None else (sources[0] if len(sources) == 1 else Path("report"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot write the output folder {out_dir}: {e.strerror}") from e

    runs = [read_run(p) for p in runs_paths]
    name_runs(runs, root)
    evals = [read_eval(p) for p in eval_paths]
    attach_evaluations(evals, runs, root)
    columns = summary_columns(runs)
    rows = run_rows(runs, columns, root)
    erows = eval_rows(evals)

    written: dict[str, Any] = {"runs": len(runs), "evaluations": len(evals), "out": str(out_dir)}
    files = []
    plots = []
    groups = seed_groups(runs)
    srows = seed_rows(groups, columns)
    trows = seed_tests(groups, columns)
    esrows, etrows = eval_seed_rows(evals, groups)
    trows += etrows
    if runs:
        write_csv(rows, out_dir / "report.csv")
        files.append(out_dir / "report.csv")
        plots += [
            plot_loss_curves(runs, out_dir / "loss_curves.png"),
            plot_final_metrics(runs, columns, out_dir / "final_metrics.png"),
            plot_final_grids(runs, out_dir / "final_grids.png"),
        ]
    if srows:
        write_csv(srows, out_dir / "report_seeds.csv")
        files.append(out_dir / "report_seeds.csv")
        plots.append(plot_seed_metrics(groups, srows, out_dir / "final_metrics_seeds.png"))
    if trows:
        write_csv(trows, out_dir / "report_tests.csv")
        files.append(out_dir / "report_tests.csv")
    if erows:
        write_csv(erows, out_dir / "report_eval.csv")
        files.append(out_dir / "report_eval.csv")
        plots.append(plot_metrics_vs_nfe(erows, out_dir / "metrics_vs_nfe.png"))
    if esrows:
        write_csv(esrows, out_dir / "report_eval_seeds.csv")
        files.append(out_dir / "report_eval_seeds.csv")
        plots.append(plot_metrics_vs_nfe(esrows, out_dir / "metrics_vs_nfe_seeds.png"))
    plots = [p for p in plots if p is not None]
    write_markdown(
        out_dir / "report.md",
        sources=sources,
        runs=runs,
        rows=rows,
        columns=columns,
        erows=erows,
        plots=plots,
        srows=srows,
        trows=trows,
        esrows=esrows,
    )
    files = [out_dir / "report.md", *files, *plots]
    written.update(
        {
            "files": [str(f) for f in files],
            "rows": rows,
            "eval_rows": erows,
            "seed_rows": srows,
            "seed_tests": trows,
        }
    )
    return written


def _common_root(paths: Iterable[Path]) -> Path | None:
    try:
        return Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    except ValueError:
        return None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m diffusion_lab.report",
        description="One table and plots across training runs (a Hydra multirun folder or run folders) "
        "and their evaluate outputs.",
    )
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="multirun folder, run folders or evaluate folders")
    ap.add_argument("--out", default=None, help="output folder (default: DIR; ./report for several DIRs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = report(args.dirs, args.out)
    except (ReportError, OSError, ValueError) as e:
        if os.environ.get("DIFFUSION_LAB_TRACEBACK", "0") not in ("", "0"):
            raise
        log.error("error: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        sys.exit(1)
    log.info(
        "report: %d run(s), %d evaluation(s) -> %s",
        result["runs"],
        result["evaluations"],
        ", ".join(result["files"]),
    )


if __name__ == "__main__":
    main()
