"""Output files that can be trusted: SHA-256 checksums beside checkpoints, one-line errors for a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKSUM_SUFFIX = ".sha256"
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
    """Replace `path` by `text` (temp file in the same folder + rename): a reader sees the old or the new file."""
    path = Path(path)
    with writing(path, what):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            readable_by_default(fd)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


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


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
