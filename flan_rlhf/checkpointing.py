"""Crash-safe checkpoints: atomic writes, and resume from the newest complete checkpoint.

A checkpoint is written to ``<name>.tmp-<pid>``, flushed to disk (fsync) and renamed over
``<name>`` (``os.replace`` is atomic on POSIX), so a kill during a save leaves the previous
file intact. Before resuming, candidates are checked with ``zipfile`` CRCs (``torch.save``
writes a zip archive) - no unpickling - and a truncated or corrupt file is reported and skipped.
"""
from __future__ import annotations

import glob
import logging
import os
import zipfile
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (temp file, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path:  # remote filesystems: fsspec's transactional write
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint, or ``None`` if it is (zip CRCs all match)."""
    if not os.path.isfile(path):
        return "file does not exist"
    if os.path.getsize(path) == 0:
        return "file is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check"
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "archive holds no torch checkpoint"
    except zipfile.BadZipFile:
        return "file is truncated or not a torch checkpoint"
    except OSError as err:
        return f"cannot read it ({err})"
    return None


def newest_complete_checkpoint(requested: str, checkpoint_dir: str | None) -> tuple[str | None, list[str]]:
    """Resolve ``--ckpt_path`` to the newest complete checkpoint.

    Args:
        requested: ``"last"`` or a path.
        checkpoint_dir: the ``ModelCheckpoint`` folder where ``last`` and fall-backs are searched.

    Returns:
        ``(path or None, messages)``: the checkpoint to resume from, and one line per candidate
        that was rejected (to print).
    """
    messages: list[str] = []
    candidates: list[str] = []
    if requested != "last":
        candidates.append(requested)
        checkpoint_dir = checkpoint_dir or os.path.dirname(os.path.abspath(requested))
    if checkpoint_dir and os.path.isdir(checkpoint_dir):
        found = sorted(glob.glob(os.path.join(checkpoint_dir, "*.ckpt")), key=os.path.getmtime, reverse=True)
        candidates += [p for p in found if p not in candidates]
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, messages
        messages.append(f"checkpoint {path} is incomplete or corrupt ({problem}); trying the previous one")
    return None, messages
