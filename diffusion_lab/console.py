"""The console of a run: the config tree at start (rich), and the one place where third-party noise is filtered.

A normal run prints the progress bars, the config tree, Lightning's model summary and the run's summary. What
the project could fix at its source is fixed there (no `configure_model` override next to EMA, explicit
`weights_only` when saving); what it cannot is listed in `NOISE` / `LOG_NOISE` with the reason, and `quiet()`
(called by every entry point) filters exactly those messages: nothing else is hidden.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# (warning category, message regex, why it is not fixed at its source)
NOISE: list[tuple[type[Warning], str, str]] = [
    (
        FutureWarning,
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's utilities/_pytree.py uses torch's deprecated LeafSpec check (Lightning's to fix)",
    ),
    (
        Warning,
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        "runs are budgeted in steps: Lightning logs every log_every_n_steps global steps across epochs, "
        "so a short epoch loses nothing",
    ),
]
# (logger name, message regex, why): INFO lines of other packages that nobody can act on
LOG_NOISE: list[tuple[str, str, str]] = [
    (
        "lightning.pytorch.utilities.rank_zero",
        r"Tip: For seamless cloud logging",
        "Lightning advertises its LitLogger on every run without one",
    ),
    (
        "lightning.pytorch.loggers.mlflow",
        r"Experiment with name .* not found\. Creating it\.",
        "Lightning's MLFlowLogger announces (as a warning) the normal first run of an MLflow experiment",
    ),
]


class _DropMessages(logging.Filter):
    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet() -> None:
    """Filter the known third-party noise (`NOISE`, `LOG_NOISE`) in this process; idempotent."""
    for category, pattern, _ in NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _ in LOG_NOISE:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))


def config_tree(
    config: Mapping[str, Any],
    *,
    order: Sequence[str] = ("data", "model", "callbacks", "logger", "trainer", "paths"),
):
    """A rich Tree of a (resolved, plain) config: one branch per top-level key, groups first, as YAML."""
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in config] + [k for k in config if k not in order]
    for key in keys:
        value = config[key]
        branch = tree.add(str(key), style="dim", guide_style="dim")
        text = yaml.safe_dump(value, sort_keys=False).strip() if isinstance(value, Mapping) else repr(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    return tree


def print_config_tree(config: Mapping[str, Any], *, save_to: str | Path | None = None) -> None:
    """Print the config tree to the terminal and, with `save_to`, write it (plain text) to that file."""
    import rich
    from rich.console import Console

    tree = config_tree(config)
    rich.print(tree)
    if save_to is not None:
        with open(save_to, "w") as f:
            Console(file=f, width=120, color_system=None).print(tree)
