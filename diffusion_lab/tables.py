"""CSV and markdown tables and the metrics-vs-NFE plot, shared by `evaluate` (one checkpoint) and `report` (runs)."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

EVAL_KEYS = ("sampler", "steps", "nfe", "guidance_scale", "num_samples", "seed")  # what an evaluate row is of
# bookkeeping and the protocol written beside every number (seed range, class sampling, reference split:size,
# feature extractors' fingerprints), not metrics
EVAL_INFO = ("sample_seconds", "seeds", "class_sampling", "reference", "extractors")
INTERVAL_SUFFIXES = ("_lo", "_hi")  # `<metric>_lo`, `<metric>_hi`: the metric's 95% interval


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A table cell: 4 significant digits for floats, '' for None."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def md_cell(v: Any) -> str:
    return fmt(v).replace("|", "\\|")


def columns_of(rows: Iterable[dict[str, Any]], skip: Iterable[str] = ()) -> list[str]:
    """Every key of the rows, in the order they first appear, except `skip`."""
    skip, out = set(skip), []
    for row in rows:
        out += [k for k in row if k not in skip and k not in out]
    return out


def write_csv(rows: list[dict[str, Any]], path: Path, *, columns: Sequence[str] | None = None) -> None:
    """The rows as CSV (columns: given, else every key in order of appearance; missing and None cells empty)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns or columns_of(rows)), restval="")
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """The lines of a markdown table of `columns` (cells `fmt`-ed, '|' escaped)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def interval_of(row: dict[str, Any], column: str) -> tuple[float, float] | None:
    """(low, high) of `column` in `row` when both interval columns hold numbers."""
    lo, hi = (row.get(column + s) for s in INTERVAL_SUFFIXES)
    return (float(lo), float(hi)) if is_num(lo) and is_num(hi) else None


def interval_cells(
    rows: list[dict[str, Any]], columns: Sequence[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, columns) for a markdown table: `x`, `x_lo`, `x_hi` merged into one cell "x [lo, hi]"."""
    merged = [c for c in columns if all(c + s in columns for s in INTERVAL_SUFFIXES)]
    drop = {c + s for c in merged for s in INTERVAL_SUFFIXES}
    out = []
    for row in rows:
        new = dict(row)
        for c in merged:
            iv = interval_of(row, c)
            if iv is not None and is_num(row.get(c)):
                new[c] = f"{fmt(float(row[c]))} [{fmt(iv[0])}, {fmt(iv[1])}]"
        out.append(new)
    return out, [c for c in columns if c not in drop]


def colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global backend state

    return Figure(figsize=(width, height), layout="constrained")


def legend_outside(ax, handles=None, labels=None, title=None) -> None:
    kw = {"handles": handles, "labels": labels} if handles is not None else {}
    ax.legend(
        **kw, title=title, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False
    )


def plot_metrics_vs_nfe(rows: list[dict[str, Any]], path: Path, *, x_label: str = "NFE") -> Path | None:
    """One panel per metric against NFE (log axis), a line per (run, sampler, guidance scale) with the metric's
    interval as error bars where the rows have one (`_lo` / `_hi`): colour = run (or
    sampler, for a single run), marker = sampler, line style = guidance scale; rows at NFE 0 (real images) are
    dashed grey references. None when there is nothing to plot. `x_label` names the axis when "nfe" carries
    another value (evaluate's post-hoc EMA axis puts sigma_rel there)."""
    from matplotlib.lines import Line2D

    skip = {"run", *EVAL_KEYS, *EVAL_INFO}
    metrics = [
        c
        for c in columns_of(rows, skip)
        if not c.endswith(("_std", *INTERVAL_SUFFIXES)) and any(is_num(r.get(c)) for r in rows)
    ]
    points = [r for r in rows if is_num(r.get("nfe")) and r["nfe"] > 0]
    if not metrics or not points:
        return None
    refs = [r for r in rows if r.get("nfe") == 0]
    runs = list(dict.fromkeys(r.get("run", "") for r in points))
    samplers = list(dict.fromkeys(r["sampler"] for r in points))
    guidance = sorted({r.get("guidance_scale") for r in points}, key=lambda g: (g is None, g))
    hue = runs if len(runs) > 1 else samplers
    color = dict(zip(hue, colors(len(hue))))
    marker = dict(zip(samplers, itertools.cycle("osD^vP*Xh<>")))
    style = dict(zip(guidance, itertools.cycle(["-", "--", ":", "-."])))
    nfes = sorted({r["nfe"] for r in points})
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = figure(4.3 * ncols + 3.5, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for run, s, g in itertools.product(runs, samplers, guidance):
            pts = sorted(
                (r["nfe"], r[metric], interval_of(r, metric))
                for r in points
                if (r.get("run", ""), r["sampler"], r.get("guidance_scale")) == (run, s, g)
                and is_num(r.get(metric))
            )
            if pts:
                c = color[run if len(runs) > 1 else s]
                x, y, ivs = zip(*pts)
                err = [
                    [v - (iv or (v, v))[0] for v, iv in zip(y, ivs)],
                    [(iv or (v, v))[1] - v for v, iv in zip(y, ivs)],
                ]
                ax.errorbar(
                    x, y, yerr=err, color=c, marker=marker[s], linestyle=style[g], markersize=4, capsize=2
                )
        for value in dict.fromkeys(round(float(r[metric]), 6) for r in refs if is_num(r.get(metric))):
            ax.axhline(value, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(nfes, [f"{n:g}" for n in nfes])  # the measured values, plainly labelled
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_title(metric, fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=color[h], linewidth=2, marker=marker.get(h)) for h in hue]
    names = list(hue)
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", marker=marker[s], linestyle="none") for s in samplers]
        names += samplers
    if len(guidance) > 1:
        handles += [Line2D([], [], color="black", linestyle=style[g]) for g in guidance]
        names += [f"guidance {g:g}" if is_num(g) else "guidance -" for g in guidance]
    if refs:
        handles.append(Line2D([], [], color="grey", linestyle="--"))
        names.append("real images (reference)")
    legend_outside(axes[ncols - 1], handles, names)
    fig.savefig(path, dpi=110)
    return path
