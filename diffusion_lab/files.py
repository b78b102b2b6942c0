"""Output files that can be trusted: SHA-256 checksums beside checkpoints, one-line errors for a full disk."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

CHECKSUM_SUFFIX = ".sha256"
TEMP_SUFFIX = ".partial"  # hidden temp files of atomic writes: `.NAME.XXXX.partial`
_CHUNK = 1 << 22
_verified: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) of the file last verified
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputError(ValueError):
    """A file could not be written: disk full, no permission, a file where a folder should be."""


class CorruptFileError(ValueError):
    """A file's bytes differ from the checksum recorded when it was written."""


def describe_write_error(error: OSError, path: str | os.PathLike, what: str) -> str:
    """One line for an OSError while writing `path`; a full disk (or quota) says "disk full"."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"disk full: cannot write the {what} {path} (no space left on the device); free space, then rerun"
        )
    return f"cannot write the {what} {path}: {error.strerror or error}"


@contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a one-line OutputError."""
    try:
        yield
    except OSError as e:
        raise OutputError(describe_write_error(e, path, what)) from e


def readable_by_default(fd: int) -> None:
    """Give a `mkstemp` file (created 0600) the mode a plain `open` would: 0666 minus the umask."""
    os.fchmod(fd, 0o666 & ~_UMASK)


def write_text_atomic(path: str | os.PathLike, text: str, *, what: str = "file") -> Path:
    """Replace `path` by `text` (`atomic_save`): a reader sees the old or the new file."""
    with writing(path, what):
        atomic_save(text.encode(), path)
    return Path(path)


class HashingWriter:
    """A binary file wrapper that hashes (SHA-256) what is written through it and keeps the OSError a write
    raised (`error`: torch.save reports it as a RuntimeError of its zip writer)."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha256.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def checksum_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}{CHECKSUM_SUFFIX}")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in chunks) with a hashlib algorithm: sha256, md5, sha1, ..."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def recorded_checksums(path: str | os.PathLike) -> list[str]:
    """The digests `path` may have: its own (first line, `sha256sum -c` format) and, while a replacement is
    being renamed into place, the previous file's (`# previous <digest>`); [] when nothing is recorded."""
    side = checksum_path(path)
    if not side.is_file():
        return []
    return [
        line.replace("# previous", "").split()[0] for line in side.read_text().splitlines() if line.strip()
    ]


def write_checksum(path: str | os.PathLike, digest: str) -> None:
    """Record `digest` for `path` (before `path` is replaced): the previous digest stays accepted, so a kill
    between this write and the replacement leaves a file that still verifies."""
    path = Path(path)
    previous = recorded_checksums(path)[:1] if path.exists() else []
    text = f"{digest}  {path.name}\n" + "".join(f"# previous {d}\n" for d in previous if d != digest)
    write_text_atomic(checksum_path(path), text, what="checksum of")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(
    obj: Any,
    path: str | os.PathLike,
    *,
    save: Callable[[Any, Any], None] | None = None,
    checksum: bool = False,
) -> None:
    """Write `obj` (bytes as they are, else through `save`: torch.save by default) to `path` so that `path` holds
    either the old or the complete new file, never a partial one.

    The bytes go to a hidden temp file in the same folder (`.NAME.XXXX.partial`, so the rename cannot cross a
    filesystem), are fsynced, and replace `path` with `os.replace`; the folder is fsynced after the rename.
    `checksum`: the SHA-256 of the bytes (hashed while writing) is recorded in `NAME.sha256` before the rename
    (`diffusion_lab.files.write_checksum`). On any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    writer = None
    try:
        readable_by_default(fd)
        with os.fdopen(fd, "wb") as f:
            writer = HashingWriter(f)
            writer.write(obj) if isinstance(obj, bytes) else (save or torch.save)(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            write_checksum(path, writer.sha256.hexdigest())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if writer is not None and writer.error is not None and not isinstance(e, OSError):
            raise writer.error from e  # a full disk, not torch's "unexpected pos" that followed it
        raise
    _fsync_dir(path.parent)


def verify_checksum(path: str | os.PathLike) -> bool:
    """CorruptFileError when `path` does not match the checksum recorded beside it; False when none is recorded
    (files written before checksums, or by other tools), True when it matches. Verified files are remembered
    (by size and modification time), so a file is hashed once per process."""
    path = Path(path)
    expected = recorded_checksums(path)
    if not expected:
        return False
    st = path.stat()
    key = path.resolve()
    if _verified.get(key) == (st.st_size, st.st_mtime_ns):
        return True
    if sha256_file(path) not in expected:
        raise CorruptFileError(
            f"{path} is corrupted: its SHA-256 differs from the one recorded in {checksum_path(path).name} when"
            " it was written; use an earlier checkpoint of the run"
        )
    _verified[key] = (st.st_size, st.st_mtime_ns)
    return True


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` and check a file can be written in it; ValueError with the OS's reason if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"cannot write the {what} {path}: {e.strerror or e}") from e
    return path


def cache_dir() -> Path:
    """`$DIFFUSION_LAB_CACHE`, else `$XDG_CACHE_HOME/diffusion_lab`, else `~/.cache/diffusion_lab`."""
    if os.environ.get("DIFFUSION_LAB_CACHE"):
        return Path(os.environ["DIFFUSION_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffusion_lab"


def package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped in an installed package, found WITHOUT importing it (lpips imports torchvision)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root, *parts)
        if path.is_file():
            return path
    return None
