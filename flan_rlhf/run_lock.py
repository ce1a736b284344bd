"""One process at a time writes a run's checkpoint folder and export folder.

A ``fit`` holds an exclusive ``flock`` on one lock file per folder it writes, from before the
model loads until the command ends:

* a checkpoint folder's lock is ``<folder>/.flan-rlhf.lock``;
* an export folder's lock sits beside it, ``<parent>/.<name>.flan-rlhf.lock`` (the folder
  itself is replaced whole by the export, :func:`flan_rlhf.io.atomic_folder`).

The file holds the holder's pid, host and command. A second process that finds the lock held
stops at start with one line naming that process (:class:`RunLockedError`). ``flock`` locks die
with their process, so a lock file left by a process that was killed is free: the next run takes
it over and says whose it was. The holder removes its lock files when it ends.

``flock`` is advisory and per host on some network filesystems (NFS before v4 locks only on one
client): runs on two machines sharing such a folder are not kept apart.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Iterable

from flan_rlhf.io import remove_empty_folders

LOCK_NAME = ".flan-rlhf.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the lock of a folder this run would write; the message names it."""


def lock_path_for(folder: str, kind: str) -> str:
    """The lock file of ``folder``: inside it for ``kind="checkpoints"``, beside it for ``kind="export"``."""
    folder = os.path.abspath(folder)
    if kind == "checkpoints":
        return os.path.join(folder, LOCK_NAME)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}{LOCK_NAME}")


def _holder(handle_fd: int) -> dict:
    """The holder record in an open lock file (``{}`` when empty or unreadable)."""
    try:
        os.lseek(handle_fd, 0, os.SEEK_SET)
        data = os.read(handle_fd, 4096)
        record = json.loads(data.decode("utf-8")) if data.strip() else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(record: dict) -> str:
    """``process 1234 on host-a (flan-rlhf fit --config c.yaml)`` from a holder record."""
    pid, host, command = record.get("pid", "?"), record.get("host", "?"), record.get("command", "")
    return f"process {pid} on {host}" + (f" ({command})" if command else "")


@dataclass
class RunLock:
    """Exclusive locks on the folders one run writes; :meth:`acquire` them all or none.

    Attributes:
        targets: ``(folder, kind, how the user named it)`` to lock (``kind``: ``checkpoints`` / ``export``).
        notes: lines to print (locks of dead processes taken over).
    """

    targets: list[tuple[str, str, str]]
    command: str = ""
    notes: list[str] = field(default_factory=list)
    _held: list[tuple[str, int]] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    def acquire(self) -> "RunLock":
        """Take every lock, or raise :class:`RunLockedError` (holding none) naming the live holder."""
        try:
            for folder, kind, what in self.targets:
                self._take(lock_path_for(folder, kind), what)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, path: str, what: str) -> None:
        folder, missing = os.path.dirname(path), []
        while folder and not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._created += missing  # deepest first: removed on release if the run left them empty
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _holder(fd)
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"{what} is being written by {describe_holder(holder)} - wait for it to finish or stop it; two "
                    f"runs must not share a checkpoint or export folder (give this one its own)") from None
            # The file may have been removed by its last holder between our open and our lock: retry on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _holder(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.notes.append(f"note: took over the lock of {what} from {describe_holder(previous)}, which is no longer "
                              "running (it was stopped or killed)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode("utf-8"))
        self._held.append((path, fd))

    def release(self) -> None:
        """Remove and unlock every lock this run holds, and the folders taking it created that are still
        empty (a run that failed to start leaves none); idempotent."""
        while self._held:
            path, fd = self._held.pop()
            try:
                os.remove(path)  # while still locked: a waiter that opened it retries on a new file
            except OSError:
                pass
            os.close(fd)
        remove_empty_folders(self._created)
        self._created = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_lock(checkpoint_folder: str | None, export_folder: str | None, command: str = "",
             extra: Iterable[tuple[str, str, str]] = ()) -> RunLock:
    """A :class:`RunLock` over a run's checkpoint folder and export folder (either may be None)."""
    targets = []
    if checkpoint_folder:
        targets.append((checkpoint_folder, "checkpoints", f"checkpoint folder '{checkpoint_folder}'"))
    if export_folder:
        targets.append((export_folder, "export", f"export folder '{export_folder}'"))
    return RunLock([*targets, *extra], command=command)
