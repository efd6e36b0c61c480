"""Process-group plumbing: one process, ``accelerate launch`` or ``torchrun``.

Work is split into *global* batches (batch ``b`` holds indices ``[b*B, (b+1)*B)``) dealt out
round-robin to the ranks, so every batch is computed with exactly the same inputs and shapes
whatever the number of processes: a 2-process run writes the same images, latents and features
as a 1-process run. Ranks exchange nothing but a barrier: each writes its shards to the output
directory / cache, and rank 0 reads them all to compute the metrics (a shared filesystem is
assumed, as on one host).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            if self._state is not None:
                self._state.wait_for_everyone()
            else:
                torch.distributed.barrier()

    def batches(self, n: int, batch_size: int) -> list[list[int]]:
        """This rank's global batches of indices into ``range(n)``."""
        all_batches = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
        return [b for k, b in enumerate(all_batches) if k % self.world == self.rank]

    def default_device(self) -> torch.device:
        if self._state is not None:
            return torch.device(self._state.device)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_dist() -> Dist:
    """Join the process group if launched by accelerate / torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    try:
        from accelerate import PartialState

        # Without CUDA (or with ACCELERATE_USE_CPU) accelerate must be told it is a CPU job, else it
        # silently stays single-process under torchrun; CPU multi-process then uses gloo.
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        st = PartialState(cpu=cpu)
        return Dist(st.process_index, st.num_processes, st.local_process_index, str(st.backend), st)
    except ImportError:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        return Dist(td.get_rank(), td.get_world_size(), local, td.get_backend())
