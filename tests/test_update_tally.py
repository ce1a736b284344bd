"""UpdateTally (device-side guard bookkeeping) and optim.step_unless, against hand-worked cases."""
from __future__ import annotations

import math

import pytest
import torch

from flan_rlhf.optim import adamw, step_unless
from flan_rlhf.update_tally import LOSS_KEYS, UpdateTally

T, F = torch.tensor(True), torch.tensor(False)


def stats(value: float) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value) for key in LOSS_KEYS}


def test_means_are_over_accepted_minibatches_and_skips_are_counted_by_cause():
    tally = UpdateTally("cpu")
    assert not tally.add_minibatch(F, F, F, stats(1.0))
    assert tally.add_minibatch(T, F, F, stats(float("nan")))  # non-finite: skipped, its NaN not summed
    assert tally.add_minibatch(F, T, F, stats(100.0))  # ratio too far: skipped
    assert tally.add_minibatch(T, T, F, stats(7.0))  # both: counted once, as non-finite
    assert not tally.add_minibatch(F, F, F, stats(3.0))
    assert tally.group_size == 5
    assert bool(tally.end_group())  # the group held a non-finite loss: its step is dropped
    row = tally.read()
    assert row["ppo/loss/total"] == 2.0 and row["ppo/policy/approxkl"] == 2.0  # (1 + 3) / 2
    assert row["guards/nonfinite_loss_skipped"] == 2.0 and row["guards/ratio_skipped"] == 1.0
    assert row["ppo/updates"] == 0.0 and row["guards/early_stopped"] == 0.0


def test_a_group_steps_when_it_has_an_accepted_minibatch_and_no_nonfinite_one():
    tally = UpdateTally("cpu")
    tally.add_minibatch(F, T, F, stats(1.0))
    tally.add_minibatch(F, F, F, stats(1.0))
    assert not bool(tally.end_group()) and tally.group_size == 0
    tally.add_minibatch(F, T, F, stats(1.0))
    assert bool(tally.end_group())  # nothing accepted: no step (Adam would still move on zero gradients)
    tally.add_minibatch(F, F, F, stats(1.0))
    tally.add_minibatch(F, F, F, stats(1.0))
    assert not bool(tally.end_group())
    assert tally.read()["ppo/updates"] == 3.0  # 1 + 0 + 2 minibatches whose gradients were applied


def test_target_kl_stop_applies_its_own_minibatch_then_skips_the_rest_uncounted():
    tally = UpdateTally("cpu")
    assert not tally.add_minibatch(F, F, T, stats(2.0))  # passes target_kl: still applied, then stop
    assert tally.add_minibatch(F, F, F, stats(50.0))
    assert tally.add_minibatch(T, T, F, stats(50.0))  # after the stop: not counted as a guard skip
    assert not bool(tally.end_group())
    row = tally.read()
    assert row["guards/early_stopped"] == 1.0 and row["ppo/updates"] == 1.0 and row["ppo/loss/total"] == 2.0
    assert row["guards/nonfinite_loss_skipped"] == 0.0 and row["guards/ratio_skipped"] == 0.0


def test_a_skipped_minibatch_cannot_trigger_the_kl_stop():
    tally = UpdateTally("cpu")
    tally.add_minibatch(F, T, T, stats(1.0))
    assert not bool(tally.stopped)


def test_an_update_with_nothing_accepted_logs_no_loss():
    tally = UpdateTally("cpu")
    tally.add_minibatch(F, T, F, stats(1.0))
    tally.end_group()
    row = tally.read()
    assert not [key for key in row if key in LOSS_KEYS] and row["ppo/updates"] == 0.0


def _adam(fused: bool):
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = adamw([parameter], lr=0.1, weight_decay=0.01) if fused else torch.optim.AdamW([parameter], lr=0.1)
    parameter.grad = torch.ones(3)
    optimizer.step()  # one real step, so there are moments to keep
    return parameter, optimizer


@pytest.mark.parametrize("fused", [True, False])
def test_step_unless_leaves_weights_moments_and_step_count_when_skipped(fused):
    parameter, optimizer = _adam(fused)
    assert optimizer.defaults.get("fused") is (True if fused else None)
    before = parameter.detach().clone(), optimizer.state[parameter]["exp_avg"].clone()
    parameter.grad = torch.full((3,), math.nan)
    step_unless(optimizer, T)
    assert torch.equal(parameter.detach(), before[0]) and torch.equal(optimizer.state[parameter]["exp_avg"], before[1])
    assert float(optimizer.state[parameter]["step"]) == 1.0
    assert not hasattr(optimizer, "found_inf")  # the flag does not outlive the call
    parameter.grad = torch.ones(3)
    step_unless(optimizer, F)
    assert float(optimizer.state[parameter]["step"]) == 2.0 and not torch.equal(parameter.detach(), before[0])


def test_step_unless_reads_the_flag_when_a_grad_scaler_owns_found_inf(monkeypatch):
    parameter, optimizer = _adam(fused=True)
    reads = []
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or bool(self.item()))
    parameter.grad = torch.ones(3)
    step_unless(optimizer, T, scaler=object())
    assert reads == [1] and float(optimizer.state[parameter]["step"]) == 1.0


def test_step_unless_reads_the_flag_for_an_optimizer_without_torch_defaults():
    """A wrapper optimiser (DeepSpeed's, say) without ``defaults``: one host read, then step or not."""
    class Wrapped:
        def __init__(self):
            self.steps = 0

        def step(self):
            self.steps += 1

    optimizer = Wrapped()
    step_unless(optimizer, T)
    step_unless(optimizer, F)
    assert optimizer.steps == 1
