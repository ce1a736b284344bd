"""Crash-safe checkpoints: atomic writes, safe loads, and resume from the newest complete checkpoint.

* Writes: a checkpoint goes to ``<name>.tmp-<pid>``, is flushed to disk (``fsync``) and renamed
  over ``<name>`` (``os.replace`` is atomic on POSIX), and the folder is fsynced so the rename
  itself survives a power cut. A kill during a save leaves the previous file intact and at
  most a ``*.tmp-*`` leftover, which resume ignores.
* Checks: ``torch.save`` writes a zip archive whose members carry CRC-32s, so a truncated or
  corrupt file is found by reading it with :mod:`zipfile` - no unpickling.
* Loads: ``torch.load(weights_only=True)`` with numpy arrays allowed, so loading runs no
  pickled code; a checkpoint that needs more gets one line naming ``--weights_only false``
  for files the user trusts.
"""
from __future__ import annotations

import glob
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, Sequence

from lightning.pytorch.plugins.io import TorchCheckpointIO

# Words LightningCLI/Trainer treat as ckpt_path keywords rather than file paths.
LIGHTNING_CKPT_KEYWORDS = ("best", "hpc", "registry")
_LIGHTNING_DEFAULT = object()  # "use TorchCheckpointIO's own map_location default (CPU)"


class CheckpointError(ValueError):
    """A ``--ckpt_path`` that cannot be used; the message names the problem and the fix."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, durable local writes and safe (``weights_only``) loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path:  # remote filesystems: fsspec's transactional write
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        from flan_rlhf.errors import DiskFullError, disk_full_cause
        from flan_rlhf.io import atomic_file

        try:
            with atomic_file(path, "wb") as handle:  # <path>.tmp-<pid>, fsync, os.replace, fsync the folder
                torch.save(checkpoint, handle)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            full = disk_full_cause(err) or (err if "No space left on device" in str(err) else None)
            if full is None:
                raise
            raise DiskFullError(disk_full_checkpoint_message(path)) from err

    def load_checkpoint(self, path, map_location: Any = _LIGHTNING_DEFAULT, weights_only: bool | None = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` unless the caller passed ``False`` (``--weights_only false``).

        Raises:
            CheckpointError: the file holds pickled objects a safe load refuses (one line naming them).
        """
        kwargs = {} if map_location is _LIGHTNING_DEFAULT else {"map_location": map_location}
        if weights_only is False:
            return super().load_checkpoint(path, weights_only=False, **kwargs)
        import torch

        try:
            with torch.serialization.safe_globals(numpy_array_globals()):
                return super().load_checkpoint(path, weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            raise CheckpointError(unsafe_checkpoint_message(str(path), err)) from err


# Private API (pinned by tests/test_private_apis.py):
# - ``numpy._core.multiarray._reconstruct`` (``numpy.core`` before numpy 2): the global numpy arrays
#   unpickle through; allowed in ``weights_only`` loads as PyTorch's serialization notes suggest.


def disk_full_checkpoint_message(path: str) -> str:
    """The line for a checkpoint save that ran out of space: the newest intact checkpoint beside it, how to continue."""
    from flan_rlhf.interrupts import command_line, resume_command

    newest, _ = newest_complete_checkpoint(os.path.dirname(os.path.abspath(path)))
    survives = (f"the newest intact checkpoint is {newest}" if newest else "no earlier checkpoint of this run is on disk")
    return (f"no space left on device while writing checkpoint {path} (nothing was half-written; {survives}) - free "
            f"space, then continue with: {resume_command(command_line())}")


def numpy_array_globals() -> list[Any]:
    """The globals numpy arrays pickle through, allowed in ``weights_only`` loads.

    Numeric arrays rebuild from bytes; an object array's items are pickle items of their own,
    which the restricted unpickler still checks, so allowing these runs no foreign code
    (PyTorch's serialization notes suggest this list for numpy).
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(kind)) for kind in (np.uint32, np.int64, np.float32, np.float64, np.bool_)]
    return allowed


def unsafe_checkpoint_message(path: str, err: Exception, allowed_globals: Sequence[Any] = (),
                              trust_flag: str = "--weights_only false") -> str:
    """One line for a checkpoint that ``weights_only=True`` refuses, naming the refused globals and ``trust_flag``."""
    try:
        import torch

        allowed = {f"{g.__module__}.{g.__qualname__}" for g in [*numpy_array_globals(), *allowed_globals]}
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:  # noqa: BLE001 - the message must not fail; fall back to torch's first line
        names = []
    what = ", ".join(names[:4]) if names else str(err).strip().splitlines()[0][:200]
    return (
        f"checkpoint '{path}' holds pickled Python objects that a safe load (weights_only=True) refuses ({what}); "
        f"if you wrote it yourself or otherwise trust it, add {trust_flag}"
    )


def read_checkpoint_file(path: str, trusted: bool = False, mmap: bool = False, allowed_globals: Sequence[Any] = (),
                         trust_flag: str = "--weights_only false") -> dict[str, Any]:
    """Check a local checkpoint, then ``torch.load`` it on CPU - ``weights_only`` unless ``trusted``.

    The one safe loader of the package (the CLI's resume check, ``flan-rlhf export``, the demo,
    ``compare``).

    Args:
        path: a ``.ckpt`` file the user named.
        trusted: ``True`` unpickles anything (only for files you wrote or trust).
        mmap: map tensor data instead of reading it (cheap peeks at metadata).
        allowed_globals: types a safe load may rebuild besides numpy arrays (e.g. settings
            dataclasses a module built in Python stored in its hyper-parameters).
        trust_flag: the caller's opt-in to a trusted load, named in the error.

    Raises:
        CheckpointError: missing, cut short or corrupt, or holding objects a safe load refuses.
    """
    import torch

    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint '{path}' cannot be used: {problem} - pass a complete .ckpt file")
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals([*numpy_array_globals(), *allowed_globals]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(unsafe_checkpoint_message(path, err, allowed_globals, trust_flag)) from err


def state_dict_mismatch(saved: dict[str, Any], own: dict[str, Any], required: set[str] | None = None) -> str | None:
    """Why the checkpoint's ``saved`` tensors cannot load into a module whose state dict is ``own``.

    Args:
        saved: ``checkpoint["state_dict"]``.
        own: the module's ``state_dict()``.
        required: keys ``saved`` must hold (default: all of ``own``); a LoRA checkpoint holds only
            the trainable part.

    Returns:
        ``None`` when every saved tensor has a home of the same shape and every required key is
        saved, else one phrase naming the first problem (a changed LoRA rank or model size shows
        up as a shape, changed target modules as unexpected keys).
    """
    required = set(own) if required is None else required
    for key, value in saved.items():
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
            return f"'{key}' has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in this model"
    unknown = [key for key in saved if key not in own]
    missing = sorted(required - set(saved))
    if unknown or missing:
        return (f"{len(unknown)} checkpoint tensors have no place in this model (e.g. {unknown[:2]}) and "
                f"{len(missing)} of its trained tensors are not in the checkpoint (e.g. {missing[:2]})")
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint, or ``None`` if it is (zip CRCs all match)."""
    if not os.path.isfile(path):
        return "file does not exist" if not os.path.exists(path) else "not a file"
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
    except (OSError, EOFError, ValueError) as err:
        return f"cannot read it ({err})"
    return None


def _as_folders(checkpoint_dirs: str | Sequence[str] | None) -> list[str]:
    """One folder, several, or none -> a list of them."""
    if not checkpoint_dirs:
        return []
    if isinstance(checkpoint_dirs, (str, os.PathLike)):
        return [str(checkpoint_dirs)]
    return [str(folder) for folder in checkpoint_dirs]


def _folders(checkpoint_dirs: str | Sequence[str] | None) -> list[str]:
    """One folder, several, or none -> the list of those that exist."""
    return [folder for folder in _as_folders(checkpoint_dirs) if os.path.isdir(folder)]


def partial_writes(checkpoint_dirs: str | Sequence[str] | None) -> list[str]:
    """Leftovers of interrupted atomic writes (``*.tmp-<pid>``) in the folder(s) ``checkpoint_dirs``."""
    return sorted(p for folder in _folders(checkpoint_dirs) for p in glob.glob(os.path.join(glob.escape(folder), "*.tmp-*")))


def checkpoints_newest_first(checkpoint_dirs: str | Sequence[str] | None) -> list[str]:
    """``*.ckpt`` files in the folder(s) ``checkpoint_dirs``, newest modification time first."""
    found = [p for folder in _folders(checkpoint_dirs) for p in glob.glob(os.path.join(glob.escape(folder), "*.ckpt"))]
    return sorted((p for p in found if os.path.isfile(p)), key=os.path.getmtime, reverse=True)


def newest_complete_checkpoint(checkpoint_dirs: str | Sequence[str] | None) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint in the folder(s) ``checkpoint_dirs``.

    Returns:
        ``(path or None, messages)``: the checkpoint, and one line per newer candidate that was
        rejected (truncated, corrupt) - to print.
    """
    messages: list[str] = []
    for path in checkpoints_newest_first(checkpoint_dirs):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, messages
        messages.append(f"checkpoint {path} is incomplete or corrupt ({problem}); trying the previous one")
    return None, messages


@dataclass
class Resolution:
    """What ``--ckpt_path`` resolves to.

    Attributes:
        path: the checkpoint to load, or ``None`` to start from scratch.
        messages: lines to print (rejected candidates, ignored leftovers, a fresh start).
    """

    path: str | None
    messages: list[str] = field(default_factory=list)


def resolve_ckpt_path(requested: str | None, checkpoint_dirs: str | Sequence[str] | None,
                      fresh_start_allowed: bool) -> Resolution:
    """Resolve ``--ckpt_path`` before Lightning sees it.

    * ``last``: the newest *complete* checkpoint in ``checkpoint_dirs`` (the run's
      ``ModelCheckpoint`` folder, or every run's: :func:`flan_rlhf.run_folders.last_search_folders`).
      Truncated or corrupt files are reported and skipped; ``*.tmp-*`` leftovers of interrupted
      writes are ignored. With none, ``fit`` starts from scratch (``fresh_start_allowed``) and
      the other stages fail.
    * a local path: it must exist and be complete; it is never silently replaced by another
      file (training on from, or evaluating, a step other than the one named would surprise),
      but the error names the newest complete checkpoint in the same folder.
    * ``None``, ``best``/``hpc``/``registry`` and URLs are left to Lightning.

    Raises:
        CheckpointError: a missing or corrupt path, or ``last`` with nothing to load when a
            fresh start is not allowed.
    """
    if not requested or requested in LIGHTNING_CKPT_KEYWORDS or "://" in str(requested):
        return Resolution(requested)
    if requested == "last":
        path, messages = newest_complete_checkpoint(checkpoint_dirs)
        messages += [f"ignoring {leftover} (an interrupted write; safe to delete)" for leftover in partial_writes(checkpoint_dirs)]
        if path is not None:
            return Resolution(path, messages)
        folders = _as_folders(checkpoint_dirs)
        where = (", ".join(folders[:3]) + (f" (and {len(folders) - 3} more)" if len(folders) > 3 else "")
                 if folders else "the run's checkpoint folder (none found)")
        if fresh_start_allowed:
            return Resolution(None, messages + [f"no complete checkpoint in {where}; starting from scratch"])
        raise CheckpointError(
            f"--ckpt_path last found no complete checkpoint in {where}; train first or pass a .ckpt file"
        )
    requested = str(requested)
    if not os.path.exists(requested):
        raise CheckpointError(
            f"checkpoint '{requested}' does not exist - pass an existing .ckpt file, or --ckpt_path last to use "
            "the newest complete checkpoint of the run"
        )
    problem = checkpoint_problem(requested)
    if problem is None:
        return Resolution(requested)
    alternative, _ = newest_complete_checkpoint(os.path.dirname(os.path.abspath(requested)))
    hint = f"pass another checkpoint, e.g. {alternative}" if alternative else "pass another checkpoint"
    raise CheckpointError(
        f"checkpoint '{requested}' is incomplete or corrupt ({problem}) - {hint}, or --ckpt_path last"
    )


# ---------------------------------------------------------------------------------------------
# RNG states in a form that ``torch.load(weights_only=True)`` accepts (tensors, ints, floats, str)
# ---------------------------------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and python global RNG states as tensors and plain numbers.

    ``np.random.get_state()`` is a tuple holding a numpy array, which a ``weights_only`` load
    refuses, so its 624 MT19937 words are stored as an int64 tensor (same for python's
    ``random``), and :func:`restore_rng_states` rebuilds the exact tuples.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor], "numpy": {...}, "python": {...}}``.
    """
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng_states` output.

    Also accepts the older layout (numpy's and python's own state tuples), so checkpoints
    written before the change still resume.
    """
    import random

    import numpy as np
    import torch

    torch.random.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    state = states["numpy"]
    if isinstance(state, dict):
        state = (state["bit_generator"], state["keys"].numpy().astype(np.uint32), state["pos"],
                 state["has_gauss"], state["cached_gaussian"])
    np.random.set_state(state)
    state = states["python"]
    if isinstance(state, dict):
        state = (state["version"], tuple(int(word) for word in state["internal"].tolist()), state["gauss_next"])
    random.setstate(state)
