"""The one atomic writer and the one table reader of the package.

Writes (no half-written output, ever):

* :func:`atomic_file` - a file is written to ``<path>.tmp-<pid>``, flushed and fsynced, renamed
  over ``path`` (``os.replace`` is atomic on POSIX) and the folder is fsynced so the rename
  itself survives a power cut. A crash leaves the old file (or none) plus at most a
  ``*.tmp-<pid>`` leftover, which checkpoint resume recognises and ignores.
* :func:`atomic_folder` - a folder is filled in a temporary sibling folder that is renamed into
  place; a crash leaves the old folder or the new one, never a half-written one.
* :func:`append_jsonl` - the one appender of JSON lines, for logs that grow while a run goes on
  (``predict``'s rows, a CSV logger's sample rows). Not atomic: a crash may cut its last line,
  as it may a logger's own files; earlier lines are never rewritten.

Reads (what every reader of jsonl/json/csv/parquet/txt files shares):

* :data:`FORMATS` - the one suffix -> format table; :data:`DATASETS_BUILDERS` - the ``datasets``
  builder of each format; :func:`file_format` / :func:`table_format` look a path up.
* :func:`refuse_binary` and :func:`read_utf8` - "this is text" and "this is UTF-8", both failing
  with a one-line :class:`TextFileError` that carries the facts (line, byte) for callers that
  word the line themselves (each names its own option: ``--input``, ``--data.data_files``).

This module is the bottom of the package: it imports nothing from ``flan_rlhf``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append ``records`` to the JSON-lines file ``path`` (made, with its folder, if missing); non-ASCII kept."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def remove_empty_folders(folders: Iterable[str | os.PathLike]) -> None:
    """``rmdir`` each of ``folders`` (in order, deepest first) that exists and is empty; leave the rest."""
    for folder in folders:
        try:
            os.rmdir(folder)  # refuses a folder that holds anything
        except OSError:
            pass


def fsync_folder(folder: str | os.PathLike) -> None:
    """``fsync`` a directory so renames inside it are on disk (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8",
                newline: str | None = None) -> Iterator[IO]:
    """Yield a handle whose content replaces ``path`` when the block ends without an error.

    Guarantees:
        * on success ``path`` holds exactly what the block wrote, flushed and fsynced, and the
          rename is fsynced too (the parent folder is created if missing);
        * on any error (including ``KeyboardInterrupt``) the temporary file is removed and
          ``path`` keeps its old content (or stays absent);
        * the temporary file is ``<path>.tmp-<pid>`` in the same folder: a kill (where no code
          runs) leaves at most that, which ``checkpointing.partial_writes`` finds by ``*.tmp-*``.

    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: text encoding (text mode only).
        newline: as for :func:`open` (text mode only); ``"\\n"`` writes the same bytes everywhere.

    Raises:
        IsADirectoryError: ``path`` is a folder (nothing is written).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes with mode 'w' or 'wb', not {mode!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    text = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    try:
        with open(tmp, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    fsync_folder(folder)  # make the rename itself durable


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling folder to fill; when the block succeeds it replaces ``folder``.

    Guarantees:
        * on success ``folder`` is the filled folder; an existing ``folder`` is exchanged with it in
          one atomic step and then removed, so at every instant one complete folder stands at the
          path (Linux; elsewhere it is renamed aside first, see :func:`_swap_in`); the parent
          folder is created if missing and fsynced after the rename;
        * on any error the temporary folder is removed and ``folder`` is untouched;
        * the temporary folder is hidden: ``.<name>.tmp-<random>`` next to ``folder``.

    Whether ``folder`` may be replaced at all is the caller's business
    (:func:`flan_rlhf.output_dirs.atomic_output_dir` checks before and again inside the block).
    Files written inside are not fsynced one by one.
    """
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(folder))}.tmp-", dir=parent)
    try:
        yield tmp
        follow_umask(tmp)
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_folder(parent)


def creation_modes(parent: str) -> tuple[int, int]:
    """``(file mode, folder mode)`` that ``open()`` and ``os.mkdir`` give a new entry in ``parent``:
    ``0o666`` and ``0o777`` less the umask (and whatever default ACL the folder has), read from a probe
    created and removed there (no process-wide ``os.umask`` swap)."""
    probe = os.path.join(parent, f".mode-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(probe, "x"):
        pass
    try:
        file_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.remove(probe)
    os.mkdir(probe)
    try:
        folder_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    return file_mode, folder_mode


def follow_umask(folder: str) -> None:
    """Give ``folder`` and everything in it the modes new files and folders get beside it.

    ``tempfile.mkdtemp`` makes folders 0700 and safetensors writes its files 0600, whatever the
    umask; an export or checkpoint folder is meant to be shared like any other file the user writes.
    """
    file_mode, folder_mode = creation_modes(os.path.dirname(os.path.abspath(folder)))
    for root, folders, files in os.walk(folder):
        os.chmod(root, folder_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def exchange_paths(a: str, b: str) -> bool:
    """Swap what two paths name in one atomic step, or return ``False`` where that is not possible.

    Linux ``renameat2(..., RENAME_EXCHANGE)`` (rename(2), Linux >= 3.15, glibc >= 2.28), called
    through ctypes because Python's ``os`` does not expose it; other systems, and filesystems that
    refuse the flag, get ``False`` and the caller falls back to two renames.
    """
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def _swap_in(tmp: str, folder: str) -> None:
    """Rename ``tmp`` to ``folder``. An existing ``folder`` is exchanged with ``tmp`` in one atomic step
    (:func:`exchange_paths`) and then removed; where that is not possible it is renamed aside first,
    which leaves no folder at the path for the instant between the two renames."""
    if not os.path.isdir(folder):
        os.replace(tmp, folder)
        return
    if exchange_paths(tmp, folder):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tmp + ".old"
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# table formats
# ---------------------------------------------------------------------------------------------
FORMATS: dict[str, str] = {
    ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt",
}
"""Suffix (lower case) -> format: every file format a reader of the package takes (each takes some)."""

DATASETS_BUILDERS: dict[str, str] = {
    "jsonl": "json", "json": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet",
}
"""Format -> the ``datasets`` packaged builder that reads it."""


def file_format(path: str | os.PathLike) -> str | None:
    """The format of ``path`` by its suffix (any case), or ``None`` when :data:`FORMATS` lacks it."""
    return FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())


def suffix_choices(suffixes: Sequence[str]) -> str:
    """``(".a", ".b", ".c")`` -> ``".a, .b or .c"``, for messages."""
    return suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"


def table_format(path: str | os.PathLike, accepted: Sequence[str], what: str | None = None) -> str:
    """The format of ``path``, whose suffix must be one of ``accepted`` (keys of :data:`FORMATS`).

    Args:
        what: how the message names the file (default: the path itself).

    Raises:
        ValueError: one line, ``cannot read <what> (suffix '.x'): use <accepted>``.
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in accepted:
        raise ValueError(
            f"cannot read {what or path} (suffix {Path(path).suffix!r}): use {suffix_choices(accepted)}"
        )
    return FORMATS[suffix]


# ---------------------------------------------------------------------------------------------
# text checks
# ---------------------------------------------------------------------------------------------
BINARY_SNIFF_BYTES = 8192  # a NUL byte in this much of a file's head marks it binary


class TextFileError(ValueError):
    """A file that is not UTF-8 text; the message is one line naming the file, the line and the byte.

    Attributes:
        path: the file.
        problem: ``"binary"`` (it holds a NUL byte) or ``"not UTF-8"``.
        offset: 0-based position of the first offending byte.
        byte: that byte's value.
        line: its 1-based line number.
        reason: what is wrong with it (``NUL byte``, or the codec's ``invalid continuation byte``...).
    """

    def __init__(self, path: str | os.PathLike, problem: str, raw: bytes, offset: int, reason: str) -> None:
        self.path, self.problem, self.offset, self.reason = os.fspath(path), problem, offset, reason
        self.byte = raw[offset]
        self.line = raw.count(b"\n", 0, offset) + 1
        what = "binary, not text" if problem == "binary" else "not valid UTF-8"
        super().__init__(f"{self.path} is {what} (line {self.line}, byte {offset}: {reason})")


def refuse_binary(path: str | os.PathLike) -> None:
    """Check that ``path`` is text, by its first :data:`BINARY_SNIFF_BYTES` bytes.

    Raises:
        TextFileError: ``problem="binary"``, a NUL byte (which no text file holds) is there.
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as handle:
        head = handle.read(BINARY_SNIFF_BYTES)
    if b"\x00" in head:
        raise TextFileError(path, "binary", head, head.index(b"\x00"), "NUL byte")


def read_utf8(path: str | os.PathLike) -> str:
    """The whole text of ``path``, decoded as UTF-8 (newlines as they are in the file).

    Raises:
        TextFileError: ``problem="not UTF-8"``, at the first byte that does not decode.
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextFileError(path, "not UTF-8", raw, err.start, err.reason) from None
