"""The infinite, resumable, rank-sharded training stream (flan_rlhf.data.stream)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from flan_rlhf.data.stream import PromptBatchStream


def take(stream: PromptBatchStream, n_batches: int) -> list[list[int]]:
    return [batch.tolist() for batch in itertools.islice(iter(stream), n_batches)]


def test_resume_at_batch_k_equals_batches_k_on_of_a_fresh_stream():
    fresh = take(PromptBatchStream(n_rows=13, batch_size=4, seed=5), 12)
    for k in (1, 3, 7):
        resumed = take(PromptBatchStream(n_rows=13, batch_size=4, seed=5, start_batch=k), 12 - k)
        assert resumed == fresh[k:]


def test_every_epoch_is_a_permutation_and_epochs_reshuffle():
    batches = take(PromptBatchStream(n_rows=10, batch_size=5, seed=0), 6)
    epochs = [batches[0] + batches[1], batches[2] + batches[3], batches[4] + batches[5]]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_batches_straddling_an_epoch_boundary_still_cover_each_epoch_once():
    flat = [row for batch in take(PromptBatchStream(n_rows=7, batch_size=3, seed=1), 7) for row in batch]
    assert len(flat) == 21
    assert all(sorted(flat[i:i + 7]) == list(range(7)) for i in (0, 7, 14))


def test_ranks_are_disjoint_and_together_form_the_global_batch():
    batch_size, world_size = 4, 3
    single = take(PromptBatchStream(n_rows=50, batch_size=batch_size * world_size, seed=2), 6)
    per_rank = [take(PromptBatchStream(50, batch_size, seed=2, rank=r, world_size=world_size), 6)
                for r in range(world_size)]
    for k in range(6):
        slices = [per_rank[r][k] for r in range(world_size)]
        assert sum(slices, []) == single[k]  # rank r takes the r-th contiguous slice
        assert len(set(sum(slices, []))) == batch_size * world_size  # 12 <= 50 rows: no overlap
    resumed_rank1 = take(PromptBatchStream(50, batch_size, seed=2, start_batch=4, rank=1, world_size=3), 2)
    assert resumed_rank1 == per_rank[1][4:6]


def test_same_seed_same_order_other_seed_other_order():
    a = take(PromptBatchStream(n_rows=20, batch_size=5, seed=7), 8)
    assert a == take(PromptBatchStream(n_rows=20, batch_size=5, seed=7), 8)
    assert a != take(PromptBatchStream(n_rows=20, batch_size=5, seed=8), 8)


def test_seed_plus_one_is_not_the_next_epoch():
    # seeding epoch e with seed + e would make epoch 1 of seed 0 equal epoch 0 of seed 1
    seed0 = take(PromptBatchStream(n_rows=30, batch_size=30, seed=0), 2)
    seed1 = take(PromptBatchStream(n_rows=30, batch_size=30, seed=1), 1)
    assert seed0[1] != seed1[0]


def test_dataloader_workers_do_not_duplicate_or_reorder_batches():
    stream = PromptBatchStream(n_rows=11, batch_size=3, seed=4, start_batch=2)
    expected = take(stream, 7)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    got = [batch.tolist() for batch in itertools.islice(iter(loader), 7)]
    assert got == expected


def test_make_batch_receives_row_indices():
    stream = PromptBatchStream(n_rows=5, batch_size=2, seed=0,
                               make_batch=lambda rows: {"rows": rows.tolist()})
    first = next(iter(stream))
    assert first["rows"] == take(PromptBatchStream(n_rows=5, batch_size=2, seed=0), 1)[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_rows=0, batch_size=2), "at least one row"),
    (dict(n_rows=4, batch_size=0), "batch_size > 0"),
    (dict(n_rows=4, batch_size=2, rank=2, world_size=2), r"rank 2 is outside \[0, world_size=2\)"),
])
def test_bad_stream_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptBatchStream(**kwargs)
    assert torch.is_tensor(next(iter(PromptBatchStream(n_rows=4, batch_size=2))))
