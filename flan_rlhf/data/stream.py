"""The infinite, resumable, rank-sharded training stream of prompt rows.

The order of training rows is a pure function of ``(seed, n_rows)``; which rows a rank gets
for a batch is a pure function of ``(batch index, rank, world size, batch size)``. Nothing
else (no sampler state, no worker state) is involved, so a run restarted at batch ``k``
sees exactly the batches an uninterrupted run would have seen from ``k`` on.

Scheme:

- The *global stream* is the concatenation of per-epoch permutations of ``range(n_rows)``.
  Epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(n_rows)``; numpy mixes the
  pair ``[seed, e]`` through ``SeedSequence``, so, unlike seeding with ``seed + e``, epoch 1
  of seed 0 is unrelated to epoch 0 of seed 1.
- Global batch ``k`` is stream positions ``[k*B*W, (k+1)*B*W)`` (``B`` = per-rank batch size,
  ``W`` = world size); rank ``r`` takes positions ``[k*B*W + r*B, k*B*W + (r+1)*B)``. A batch
  may straddle an epoch boundary; every row appears once per epoch of the global stream.
- With ``num_workers = N > 0`` DataLoader workers, worker ``w`` produces batches
  ``k = start_batch + w, start_batch + w + N, ...``; PyTorch's DataLoader returns worker
  outputs round-robin in worker order, so the loader's output order is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Row order of epoch ``epoch``: ``np.random.default_rng([seed, epoch]).permutation(n_rows)``.

    Returns:
        int64 array of shape ``(n_rows,)``.
    """
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def stream_rows(n_rows: int, seed: int, start: int, stop: int) -> np.ndarray:
    """Rows at global stream positions ``[start, stop)`` (int64 array of shape ``(stop - start,)``)."""
    positions = np.arange(start, stop, dtype=np.int64)
    epochs = positions // n_rows
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        rows[in_epoch] = epoch_permutation(n_rows, seed, int(epoch))[positions[in_epoch] % n_rows]
    return rows


class PromptBatchStream(IterableDataset):
    """Infinite stream of this rank's training batches, starting at global batch ``start_batch``.

    Use with ``DataLoader(stream, batch_size=None)``: each item is already a batch.

    Args:
        n_rows: number of training rows (indices ``0..n_rows-1``).
        batch_size: rows per batch on each rank (``B``).
        seed: non-negative seed of the row order.
        start_batch: index of the first global batch to yield (e.g. the PPO iteration to resume at).
        rank: this process's rank ``r`` in ``[0, world_size)``.
        world_size: number of ranks ``W`` sharing each global batch.
        make_batch: maps the ``(B,)`` int64 array of row indices to the batch object; ``None``
            yields the row indices as a ``LongTensor`` of shape ``(B,)``.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        make_batch: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        super().__init__()
        if n_rows <= 0:
            raise ValueError(
                f"the training stream needs at least one row, got n_rows={n_rows}; check the train split"
            )
        if batch_size <= 0 or world_size <= 0 or start_batch < 0 or seed < 0:
            raise ValueError(
                "PromptBatchStream needs batch_size > 0, world_size > 0, start_batch >= 0 and seed >= 0; "
                f"got batch_size={batch_size}, world_size={world_size}, start_batch={start_batch}, "
                f"seed={seed}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self.make_batch = make_batch

    def rows_of_batch(self, batch_index: int) -> np.ndarray:
        """This rank's row indices for global batch ``batch_index`` (int64, shape ``(batch_size,)``)."""
        start = (batch_index * self.world_size + self.rank) * self.batch_size
        return stream_rows(self.n_rows, self.seed, start, start + self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        batch_index = self.start_batch + worker_id
        while True:
            rows = self.rows_of_batch(batch_index)
            yield torch.from_numpy(rows) if self.make_batch is None else self.make_batch(rows)
            batch_index += num_workers


def stream_position(trainer: Any) -> tuple[int, int, int]:
    """``(start_batch, rank, world_size)`` of a training stream fed to ``trainer`` (``(0, 0, 1)`` without one):
    a module that makes one step per batch resumes at batch ``trainer.global_step``."""
    if trainer is None:
        return 0, 0, 1
    return int(trainer.global_step), int(trainer.global_rank), int(trainer.world_size)
