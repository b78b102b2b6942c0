"""The entry points' error handler: a user-facing error ends in one line `error: <cause>` and exit code 1."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

TRACEBACK_ENV = "DIFFUSION_LAB_TRACEBACK"


def one_line(error: BaseException) -> str:
    """The error's message on one line; wrapper errors (Hydra's InstantiationException) show their cause."""
    cause = error.__cause__
    text = " ".join(str(error).split())
    if type(error).__name__ == "InstantiationException" and cause is not None:
        target = text.split("'")[1] if text.count("'") >= 2 else ""
        return f"{target}: {one_line(cause)}" if target else one_line(cause)
    if not text:
        text = type(error).__name__
    return text


@contextmanager
def exit_on_user_error(
    extra: tuple[type[BaseException], ...] = (), *, reraise: bool = False
) -> Iterator[None]:
    """In a CLI: log `error: <one-line cause>` and exit 1 on a user-facing error (bad config, data, checkpoint).

    `DIFFUSION_LAB_TRACEBACK=1` (or `HYDRA_FULL_ERROR=1`) re-raises, for the full traceback; so does
    `reraise=True` after logging (a Hydra sweep records the failed job and runs the others)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from diffusion_lab.callbacks.nan_guard import NonFiniteTrainingError
    from diffusion_lab.data.base import DataError

    try:
        yield
    except (ValueError, DataError, NonFiniteTrainingError, MisconfigurationException, *extra) as e:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("error: %s", one_line(e))
        if reraise:  # a sweep records the failed job; Hydra prints this message, not a traceback
            from hydra.errors import CompactHydraException

            raise CompactHydraException("(each failed job of the sweep logged its cause above)") from e
        sys.exit(1)


def file_argument(value: Any, key: str) -> str:
    """A CLI argument that names a file, as a string; ValueError naming `key` when it is no path at all."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{key} must be a file path, got {value!r}")
    return str(value)
