"""Folders flan-rlhf writes (exports, saved models): written whole or not at all, and never over
anything the user did not let it replace.

Every such folder holds a manifest, ``flan_rlhf_export.json``: what wrote it, the id of the run
that wrote it, and the list of files written. An existing folder may be replaced only when

* it is empty; or
* it is a flan-rlhf folder holding nothing but the files its manifest lists, **and** either the
  same run wrote it (a resumed fit re-exporting) or the caller opted in (``--overwrite``,
  ``overwrite_export_dir``);

and never when it holds an input the command reads (a checkpoint inside ``--out``). A folder of
checkpoints, results or anything else the user made has no manifest, so no flag replaces it.

Writes go to a temporary sibling folder that is renamed into place (POSIX ``rename`` is atomic):
a crash leaves the old folder or the new one, never a half-written one.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from flan_rlhf.io import atomic_folder

MANIFEST = "flan_rlhf_export.json"
RUN_ID_KEY = "flan_rlhf_run_id"  # checkpoint key: the id of the run, kept across resumes


class OutputDirError(ValueError):
    """An output folder that must not be written or replaced; the message names the fix."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None


def folder_files(folder: str | os.PathLike) -> list[str]:
    """Every file and symlink under ``folder``, as sorted ``/``-separated relative paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def replacement_problem(
    folder: str | os.PathLike,
    *,
    overwrite: bool,
    opt_in: str,
    what: str,
    run_id: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> str | None:
    """Why writing ``folder`` would lose something, or ``None`` when it is safe.

    Args:
        folder: the output folder.
        overwrite: the user opted in to replacing an earlier flan-rlhf folder.
        opt_in: how the user opts in, for the message (``--overwrite true``).
        what: how the user named the folder, for the message (``--out 'x'``).
        run_id: this run's id: an earlier export of the same run is replaced without opting in.
        inputs: files or folders this command reads; a folder holding one is never replaced.
    """
    folder = os.fspath(folder)
    if os.path.isfile(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        return f"{what} is a file, not a folder - pass a folder path"
    if not os.path.isdir(folder):
        return None
    for source in inputs:
        if source is not None and _inside(os.fspath(source), folder):
            return f"{what} holds the input '{source}' this command reads - choose another output folder"
    files = folder_files(folder)
    if not files:
        return None
    manifest = read_manifest(folder)
    if manifest is None:
        return (f"{what} already holds files flan-rlhf did not write (e.g. {', '.join(files[:3])}) - choose a new or "
                f"empty folder ({opt_in} only replaces an earlier flan-rlhf export)")
    foreign = [name for name in files if name != MANIFEST and name not in set(manifest["files"])]
    if foreign:
        return (f"{what} holds an earlier export plus files it did not write (e.g. {', '.join(foreign[:3])}) - move "
                f"them out or choose another folder")
    if run_id is not None and manifest.get("run_id") == run_id:
        return None
    if overwrite:
        return None
    return (f"{what} already holds an earlier export ({manifest.get('format', 'export')} written by "
            f"{manifest.get('written_by', 'flan-rlhf')}) - pass {opt_in} to replace it, or choose another folder")


def check_replaceable(folder: str | os.PathLike, **kwargs: Any) -> None:
    """Raise :class:`OutputDirError` with :func:`replacement_problem`'s line, if any."""
    problem = replacement_problem(folder, **kwargs)
    if problem is not None:
        raise OutputDirError(problem)


@contextmanager
def atomic_output_dir(
    folder: str | os.PathLike,
    manifest: dict[str, Any],
    **check: Any,
) -> Iterator[str]:
    """Yield a temporary sibling folder to fill; on success it gets the manifest and replaces ``folder``.

    ``folder`` is checked (:func:`check_replaceable` with ``check``) before and again just before
    the rename, so a folder that appeared meanwhile is not lost either. On any error the
    temporary folder is removed and ``folder`` is untouched.

    Args:
        folder: the output folder.
        manifest: facts to record (``format``, ``written_by``, ``run_id``, sources...); ``files``
            is filled in with what the block wrote.
    """
    folder = os.fspath(folder)
    check_replaceable(folder, **check)
    with atomic_folder(folder) as tmp:  # the temporary sibling, the swap, the clean-up on error
        yield tmp
        record = {**manifest, "files": [name for name in folder_files(tmp) if name != MANIFEST]}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True, default=str)
        check_replaceable(folder, **check)


class GuardedExportMixin:
    """For LightningModules that write one folder when ``fit`` ends.

    Gives each run an id (kept in checkpoints, so a resumed run keeps it), refuses an export
    folder that :func:`replacement_problem` would lose before training starts (CLI) and again in
    ``on_train_start`` (plain ``Trainer.fit``; all strategies have restored by then), and writes
    the export through :func:`atomic_output_dir`.

    Subclasses implement :meth:`export_target`.
    """

    _run_id: str | None = None

    @property
    def run_id(self) -> str:
        """This run's id: new for a fresh fit, the checkpoint's after a resume."""
        if self._run_id is None:
            self._run_id = new_run_id()
        return self._run_id

    def export_target(self) -> tuple[str | None, bool, str]:
        """``(folder or None, overwrite opted in, how to opt in)``."""
        raise NotImplementedError

    def _export_check(self) -> dict[str, Any]:
        folder, overwrite, opt_in = self.export_target()
        return {"overwrite": overwrite, "opt_in": opt_in, "what": f"export folder '{folder}'", "run_id": self.run_id}

    def check_export_target(self) -> None:
        """Raise :class:`OutputDirError` if the export at the end of fit would replace something it must not."""
        folder = self.export_target()[0]
        if folder:
            check_replaceable(folder, **self._export_check())

    @contextmanager
    def export_folder(self, manifest: dict[str, Any]) -> Iterator[str]:
        """:func:`atomic_output_dir` for this module's export folder, with the run id in the manifest."""
        folder = self.export_target()[0]
        with atomic_output_dir(folder, {**manifest, "run_id": self.run_id}, **self._export_check()) as tmp:
            yield tmp

    def on_train_start(self) -> None:
        super().on_train_start()
        self.check_export_target()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[RUN_ID_KEY] = self.run_id

    def adopt_run_id(self, checkpoint: dict[str, Any]) -> None:
        """Continue the run that wrote ``checkpoint`` (keep this id if it stores none)."""
        self._run_id = checkpoint.get(RUN_ID_KEY) or self.run_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.adopt_run_id(checkpoint)
