"""A checkpoint restores state, not settings.

Settings come from the config and the command line. On ``--ckpt_path`` the checkpoint's stored
hyper-parameters are compared with the run's:

* a setting the stored weights depend on (architecture, LoRA rank/alpha/targets, the module
  class) that differs is a conflict: the run stops with one line naming the field and both values;
* any other difference (learning rate, ``export_dir``, ...) is harmless: the run uses the command
  line's value and prints one line per difference.

Which settings are fixed is declared by each LightningModule as ``FIXED_BY_CHECKPOINT`` (dotted
paths into its hyper-parameters; a path also fixes everything under it and whether it is null).
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Iterable, Mapping, NamedTuple

CLASS_KEY = "_class_path"  # LightningCLI stores the module class here
_SKIPPED = ("_instantiator",)


class Difference(NamedTuple):
    """One setting whose stored (checkpoint) and given (config/command line) values differ."""

    key: str
    stored: Any
    given: Any


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def setting_differences(stored: Any, given: Any, prefix: str = "") -> list[Difference]:
    """Every setting present on both sides whose values differ, as dotted keys.

    Nested dicts (and dataclasses) are compared key by key; a key only one side has (a setting
    added or removed between versions) is not a difference. ``null`` on one side and a group on
    the other is one difference at the group's key.

    Example: ``setting_differences({"lora": {"r": 8}, "lr": 1}, {"lora": {"r": 4}, "lr": 1})``
    is ``[Difference("lora.r", 8, 4)]``.
    """
    stored, given = _plain(stored), _plain(given)
    if isinstance(stored, dict) and isinstance(given, dict):
        found: list[Difference] = []
        for key in sorted(set(stored) & set(given), key=str):
            if key not in _SKIPPED:
                found += setting_differences(stored[key], given[key], f"{prefix}.{key}" if prefix else str(key))
        return found
    if stored == given:
        return []
    return [Difference(prefix, stored, given)]


def is_fixed(key: str, fixed: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``fixed``, lies under one, or is a group holding one
    (``lora`` itself when LoRA is turned on or off, given ``lora.r``)."""
    for path in (*fixed, CLASS_KEY):
        if key == path or key.startswith(path + ".") or path.startswith(key + "."):
            return True
    return False


def split_differences(stored: Any, given: Any, fixed: Iterable[str]) -> tuple[list[Difference], list[Difference]]:
    """``(conflicts, harmless)``: the differences that ``fixed`` forbids, and the rest."""
    fixed = tuple(fixed)
    differences = setting_differences(stored, given)
    conflicts = [d for d in differences if is_fixed(d.key, fixed)]
    return conflicts, [d for d in differences if not is_fixed(d.key, fixed)]


def conflict_message(checkpoint_path: str, conflicts: list[Difference]) -> str:
    """One line for the first conflict (and how many more there are)."""
    first = conflicts[0]
    more = f" (and {len(conflicts) - 1} more: {', '.join(d.key for d in conflicts[1:4])})" if len(conflicts) > 1 else ""
    return (f"cannot resume from '{checkpoint_path}': {first.key} is {first.stored!r} in the checkpoint but {first.given!r} "
            f"in this run{more}, and the stored weights depend on it - set it back to {first.stored!r}, or start a fresh "
            f"run without --ckpt_path")


def difference_line(difference: Difference) -> str:
    return (f"note: {difference.key} is {difference.given!r} in this run ({difference.stored!r} in the checkpoint): "
            f"using {difference.given!r}")
