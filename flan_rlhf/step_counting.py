"""Make Lightning's ``global_step`` count PPO iterations under manual optimisation.

Under manual optimisation Lightning counts ``trainer.global_step`` once per ``optimizer.step()``
(``_ManualOptimization.optim_step_progress``). One PPO iteration makes
``ppo_epochs * minibatches`` optimiser steps, so ``--trainer.max_steps 30`` would stop after a
couple of iterations. Users think in iterations (one rollout batch and all its epochs of
updates), and resume, checkpoint names and logs should too. So during an iteration the
LightningOptimizer's step hooks are silenced, and the iteration is counted once at the end,
through the same hooks, whether or not any optimiser step happened (a fully skipped iteration
still counts: ``max_steps`` must terminate).
"""
from __future__ import annotations

# Private API (pinned by tests/test_private_apis.py):
# - ``LightningOptimizer._on_before_step`` / ``_on_after_step`` (lightning 2.6): the hooks through
#   which manual optimisation advances ``global_step`` (``_ManualOptimization``). No public way to
#   count several optimiser steps as one exists.

from contextlib import contextmanager
from typing import Iterator


def _noop() -> None:
    return None


@contextmanager
def count_as_one_step(lightning_optimizer) -> Iterator[None]:
    """Within the block, optimiser steps do not advance ``global_step``; on exit it advances by 1.

    Args:
        lightning_optimizer: the ``LightningOptimizer`` returned by ``self.optimizers()``.
    """
    before, after = lightning_optimizer._on_before_step, lightning_optimizer._on_after_step
    lightning_optimizer._on_before_step, lightning_optimizer._on_after_step = _noop, _noop
    try:
        yield
    finally:
        lightning_optimizer._on_before_step, lightning_optimizer._on_after_step = before, after
    before()
    after()
