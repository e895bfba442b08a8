"""The order in which training prompts are drawn, shared by all ranks, resumable.

Every rank computes the same permutation per epoch from (seed, epoch) and takes its own
slice of each global batch, so resampling in lock-step (every rank pulls one more global
batch) keeps all ranks on the same position without communication.
"""

from __future__ import annotations

import torch


class PromptStream:
    """Indices of training rows, drawn one global batch at a time."""

    def __init__(self, n_rows: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError("the global batch must split evenly over the processes")
        if n_rows < global_batch:
            raise ValueError(f"the training split has {n_rows} rows, fewer than one global batch of "
                             f"{global_batch} prompts (prompts_per_device * grad_accum * processes): "
                             f"lower train.prompts_per_device or train.grad_accum, or add data")
        self.n_rows, self.global_batch, self.seed = n_rows, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n_rows // global_batch  # a partial last batch is dropped
        self.epoch, self.batch_in_epoch, self.batches_consumed = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n_rows, generator=g).tolist()

    @property
    def epochs_done(self) -> float:
        return self.batches_consumed / self.batches_per_epoch

    def next_local(self) -> list[int]:
        """This rank's share of the next global batch; every rank must call it equally often."""
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._order = self._permutation(self.epoch)
        start = self.batch_in_epoch * self.global_batch
        batch = self._order[start:start + self.global_batch]
        local = self.global_batch // self.world_size
        self.batch_in_epoch += 1
        self.batches_consumed += 1
        return batch[self.rank * local:(self.rank + 1) * local]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "batches_consumed": self.batches_consumed, "n_rows": self.n_rows,
                "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_rows", "global_batch", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the checkpoint was made with {key}={state[key]}, "
                                 f"this run has {key}={getattr(self, key)}")
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.batches_consumed = state["batches_consumed"]
        self._order = self._permutation(self.epoch)
