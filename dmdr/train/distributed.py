"""Data-parallel training under ``torchrun``: process group, gradient averaging, per-rank RNG, rank-0 I/O.

Launch (one node, N processes; gloo on CPU, NCCL on CUDA)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=N -m dmdr train RECIPE --out DIR

The mode comes from ``DMDR_DISTRIBUTED`` (``ddp`` — the default under torchrun — or ``none``); a recipe field
``runtime.distributed`` takes precedence once it exists. What "ddp" means here (docs/reliability.md):

* every rank builds the same models (same seed) and rank 0's trainable parameters are broadcast once;
* each rank then draws its own data and noise (``seed + rank``);
* after every ``backward`` the trainable gradients are averaged with one flat ``all_reduce`` — the same
  arithmetic as :class:`~torch.nn.parallel.DistributedDataParallel` (mean of per-rank gradients), done by hand
  because the critic is a LoRA adapter on a frozen base that the generator's real/fake scores also run through,
  a shape that DDP's per-module wrapping does not fit; identical averaged gradients + identical optimiser
  arithmetic keep the replicas identical;
* a non-finite loss on any rank poisons that rank's contribution with NaN, so *every* rank sees a non-finite
  gradient norm and skips the same update;
* rank 0 alone writes checkpoints, metrics, samples and progress; every rank reads the same checkpoint on resume
  (the run directory must be on a shared filesystem for multi-node runs); a barrier follows every save.

Single-process runs (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never touch :mod:`torch.distributed`.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dmdr.errors import UserError

MODES = ("none", "ddp", "fsdp2")


class DistributedError(UserError):
    """A distributed launch that cannot work as asked (one-line message)."""


def world_size() -> int:
    """The launcher's ``WORLD_SIZE`` (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the only process that writes files or prints progress."""
    return rank() == 0


def launched() -> bool:
    """True when started by torchrun (or any launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment, once; True if distributed.

    Backend: ``cpu:gloo,cuda:nccl`` when CUDA and NCCL are available (CPU tensors go through gloo, CUDA
    tensors through NCCL), plain ``gloo`` otherwise. Idempotent; a no-op without a multi-process launch.
    """
    if not launched():
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed; launch one process")
    if dist.is_initialized():
        return True
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Destroy the process group (registered with ``atexit`` by :func:`init_from_env`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mode_for(recipe=None) -> str:
    """``none`` | ``ddp`` | ``fsdp2``: ``recipe.runtime.distributed`` if the field exists and is not ``auto``, else
    ``DMDR_DISTRIBUTED``, else ``ddp`` under a multi-process launch and ``none`` otherwise."""
    m = getattr(getattr(recipe, "runtime", None), "distributed", None)
    if m in (None, "", "auto"):
        m = os.environ.get("DMDR_DISTRIBUTED")
    if m in (None, "", "auto"):
        m = "ddp" if launched() else "none"
    if m not in MODES:
        raise DistributedError(f"distributed mode {m!r}: use one of {', '.join(MODES)} (DMDR_DISTRIBUTED or "
                               f"runtime.distributed)")
    return m


def require_single_process(what: str) -> None:
    """Refuse a multi-process launch for code paths that are not data-parallel (one-line error)."""
    if launched():
        raise DistributedError(f"{what} runs in one process; launch it without torchrun (WORLD_SIZE="
                               f"{os.environ.get('WORLD_SIZE')})")


@dataclass
class DistContext:
    """What the trainer needs to know and do about data parallelism. ``active`` is False in one process."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True under FSDP2 (:class:`dmdr.train.fsdp.FSDPContext`): parameters are shards, collectives in backward."""
        return False

    def agree_finite(self, finite: bool) -> bool:
        """Whether this rank may run ``backward`` (FSDP2 makes every rank agree first; here: ``finite``)."""
        return finite

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # ---- collectives (all no-ops when inactive) -------------------------------------------------------------------
    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s values (one flat broadcast)."""
        if not self.active or not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
            dist.broadcast(flat, src)
            _unflatten_into(flat, tensors)

    def average_grads_(self, params: list[torch.Tensor], *, poison: bool = False) -> None:
        """Replace every ``p.grad`` by its mean over ranks (missing grads count as zeros).

        ``poison=True`` (this rank's loss was non-finite) contributes NaN, so that all ranks see a non-finite
        gradient norm and skip the update together."""
        if not self.active or not params:
            return
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            if poison:
                flat.fill_(float("nan"))
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g
            _unflatten_into(flat, [p.grad for p in params])

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (used to agree on stopping)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean_scalars(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (same keys on every rank, in the same order)."""
        if not self.active or not values:
            return values
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def same_int(self, value: int, what: str) -> None:
        """Raise on every rank if ``value`` differs between ranks (e.g. the resumed step)."""
        if not self.active:
            return
        t = torch.tensor([value, -value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise DistributedError(f"ranks disagree on {what} ({-int(t[1])}..{int(t[0])}); every rank must read the "
                                   f"same run directory (a shared filesystem for multi-node runs)")

    def gather_tensor_dicts(self, d: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """All ranks' ``d`` (same keys and shapes on every rank), as a list indexed by rank; no pickling."""
        if not self.active:
            return [d]
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world_size)]
        for k in sorted(d):
            v = d[k].detach().cpu().contiguous()
            parts = [torch.empty_like(v) for _ in range(self.world_size)]
            dist.all_gather(parts, v)
            for r, p in enumerate(parts):
                out[r][k] = p
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _device(self) -> torch.device:
        # with the mixed backend, CPU tensors go through gloo
        return torch.device("cpu")


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i:i + n].view_as(t).to(t.dtype))
        i += n


def setup(recipe=None) -> DistContext:
    """The :class:`DistContext` for this process (initialising the process group under torchrun)."""
    m = mode_for(recipe)
    from dmdr.train import fsdp

    fsdp.check_options(recipe, m)
    if m == "fsdp2":  # also for torchrun --nproc_per_node 1 (dmdr/train/fsdp.py)
        return fsdp.setup(recipe)
    if not launched():
        return DistContext()
    if m == "none":
        raise DistributedError(f"launched with WORLD_SIZE={world_size()} but the distributed mode is none: the "
                               f"processes would overwrite each other's run; set DMDR_DISTRIBUTED=ddp or launch one")
    init_from_env()
    return DistContext(mode=m, rank=dist.get_rank(), world_size=dist.get_world_size())
