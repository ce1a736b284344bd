"""The one interface every reward source implements.

A reward maps ``(prompts, responses)`` to one float score per response, higher is better.
A reward that compares a response with its row's reference texts (ROUGE, BLEU:
:mod:`flan_rlhf.rewards.reference`) sets ``needs_references`` and also receives
``references``, which flow from the data module's ``reference_columns`` through the rollout.
Sources that are made of parts (a composite, a multi-label detoxify) also expose their
parts through :meth:`Reward.components` so each can be logged on its own
(``env/reward/<name>_mean``).
"""
from __future__ import annotations

import abc
from typing import Sequence

import torch

from flan_rlhf.errors import first_line


class RewardOutputError(ValueError):
    """A reward returned something that is not one finite-or-not float per response."""


class RewardOptionError(ValueError):
    """A reward built with an option it cannot take (``batch_size: 0``, an unknown mode...); the
    message names the option and what works. Raised by the constructors, so a bad config stops
    with one line before anything loads."""


class RewardReferencesError(ValueError):
    """A reward that compares responses with references was given none (or not one list per response)."""


class RewardSetupError(RuntimeError):
    """A reward that cannot load (missing checkpoint offline, unknown label...)."""


def set_up_reward(reward: "Reward", device: torch.device | str) -> "Reward":
    """``reward.setup(device)``, with a failure to load turned into one :class:`RewardSetupError` line.

    Raises:
        RewardSetupError: ``setup`` raised OSError (offline, missing file), ValueError (unknown
            label) or ImportError (a missing optional package).
    """
    try:
        reward.setup(device)
    except (OSError, ValueError, ImportError) as err:
        raise RewardSetupError(f"reward '{reward.name}' cannot be set up: {first_line(err)}") from err
    return reward


class Reward(abc.ABC):
    """Base class for reward sources.

    Subclasses implement :meth:`components`. They must be cheap to construct twice
    (LightningCLI may build them while parsing) and load heavy models lazily in
    :meth:`setup`, which the training module calls once with the policy's device.

    Attributes:
        name: short identifier used in log tags (``env/reward/<name>_mean``).
    """

    name: str = "reward"
    #: whether :meth:`components` takes ``references`` (one list of reference texts per response)
    needs_references: bool = False

    def setup(self, device: torch.device | str = "cpu") -> "Reward":
        """Load models (once) and move them to ``device``. Idempotent. Returns ``self``."""
        return self

    @abc.abstractmethod
    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Score each response.

        Args:
            prompts: ``batch`` prompt strings (the text the policy saw).
            responses: ``batch`` decoded response strings.
            references: (only when ``needs_references``; a third argument) ``batch`` non-empty
                lists of reference strings, checked by :meth:`score`.

        Returns:
            Mapping from component name to a float tensor of shape ``(batch,)``. For a single
            source this is ``{self.name: scores}``.
        """

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fold components into the scalar reward, shape ``(batch,)``. Default: the sum."""
        return torch.stack(list(components.values()), dim=0).sum(dim=0)

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[Sequence[str]] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validated scores: ``(reward, components)``.

        Args:
            references: ``batch`` lists of reference strings (a row's references, repeated for
                each of its responses); required when ``needs_references``, ignored otherwise.
        Returns:
            reward: float32 CPU tensor, shape ``(batch,)``; may hold NaN/inf (callers guard).
            components: each component as a float32 CPU tensor of shape ``(batch,)``.
        Raises:
            RewardOutputError: a component of the wrong type or shape.
            RewardReferencesError: ``needs_references`` and no reference list (or an empty one) for a response.
        """
        if self.needs_references:
            raw = self.components(prompts, responses, check_references(self.name, references, len(responses)))
        else:
            raw = self.components(prompts, responses)
        if not isinstance(raw, dict) or not raw:
            raise RewardOutputError(
                f"reward '{self.name}' returned {type(raw).__name__} from components(), "
                "expected a non-empty dict of name -> scores"
            )
        checked = {key: check_scores(key, value, len(responses)) for key, value in raw.items()}
        return check_scores(self.name, self.combine(checked), len(responses)), checked

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[Sequence[str]] | None = None
    ) -> torch.Tensor:
        """The scalar reward per response, shape ``(batch,)``, float32, on CPU."""
        return self.score(prompts, responses, references)[0]


def check_references(name: str, references: Sequence[Sequence[str]] | None, batch_size: int) -> list[list[str]]:
    """``references`` as ``batch_size`` non-empty lists of strings, or one line naming what is missing.

    Raises:
        RewardReferencesError: no references, a count that is not ``batch_size``, or a response
            whose row has none.
    """
    fix = ("give the data module the column(s) holding each row's reference texts "
           "(--data.init_args.reference_columns) or drop this reward")
    if references is None:
        raise RewardReferencesError(f"reward '{name}' compares each response with its row's references, "
                                    f"but none were given: {fix}")
    rows = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if len(rows) != batch_size:
        raise RewardReferencesError(f"reward '{name}' got {len(rows)} reference lists for {batch_size} responses: "
                                    "pass one list of reference texts per response")
    missing = [i for i, row in enumerate(rows) if not row or not all(isinstance(ref, str) for ref in row)]
    if missing:
        raise RewardReferencesError(f"reward '{name}' compares each response with its row's references, but "
                                    f"{len(missing)} of {batch_size} responses have none (e.g. row {missing[0]}): "
                                    f"{fix}; rows without a reference cannot be scored")
    return rows


def check_scores(name: str, scores: object, batch_size: int) -> torch.Tensor:
    """Validate one reward component and return it as a float32 CPU tensor of shape ``(batch,)``.

    NaN and inf are allowed through (the training loop's guard skips and counts them); a
    wrong type or shape is a bug in the reward and raises :class:`RewardOutputError`.
    """
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - we re-raise with a clear message
            raise RewardOutputError(
                f"reward '{name}' returned {type(scores).__name__}, expected a float tensor of shape "
                f"({batch_size},): make it return one number per response"
            ) from err
    if scores.dim() == 2 and scores.shape[-1] == 1:
        scores = scores.squeeze(-1)
    if tuple(scores.shape) != (batch_size,):
        raise RewardOutputError(
            f"reward '{name}' returned shape {tuple(scores.shape)}, expected ({batch_size},): "
            f"return one score per response"
        )
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.bool)):
        raise RewardOutputError(f"reward '{name}' returned dtype {scores.dtype}, expected a float tensor")
    return scores.detach().float().cpu()


def reward_names(reward: "Reward | None") -> set[str]:
    """The names a reward logs under: its own and, for a composite, each child's (recursively)."""
    if reward is None:
        return set()
    names = {reward.name}
    for child in getattr(reward, "rewards", ()) or ():
        names |= reward_names(child)
    return names


def check_monitors(reward: "Reward | None", monitors: Sequence["Reward"] | None) -> list["Reward"]:
    """``monitors`` as a list, after checking that each is a :class:`Reward` with a name of its own.

    A monitor is scored on evaluation samples and logged as ``val/monitor/<name>``; it must not be
    trained on, so its name may not be the training reward's or one of its components'.

    Raises:
        RewardOptionError: a monitor that is not a reward, two monitors with one name, or a monitor
            named like the training reward or one of its parts.
    """
    monitors = list(monitors or [])
    for monitor in monitors:
        if not isinstance(monitor, Reward):
            raise RewardOptionError(f"monitors take rewards (flan_rlhf.rewards.*), got {type(monitor).__name__}: "
                                    "give each as class_path + init_args")
    names = [monitor.name for monitor in monitors]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RewardOptionError(f"two monitors share the name {repeated[0]!r}: give each a distinct `name` "
                                "(it becomes val/monitor/<name>)")
    trained = reward_names(reward)
    clash = [name for name in names if name in trained]
    if clash:
        raise RewardOptionError(f"monitor {clash[0]!r} has the name of the training reward or one of its parts: "
                                "a monitor watches what is not trained on - drop it from monitors, or give it "
                                "another `name` if it measures something else")
    return monitors
