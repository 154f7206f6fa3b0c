"""FSDP2 for the DMDR trainer: per-block sharding, sharded optimiser states, DCP checkpoints that reshard.

``runtime.distributed: fsdp2`` (or ``DMDR_DISTRIBUTED=fsdp2``) under ``torchrun --nproc_per_node N`` (N >= 1)
shards every network that holds trainable weights with :func:`torch.distributed.fsdp.fully_shard`
(docs/distributed.md):

* **what is sharded**: the shared base (the frozen teacher weights *and* the LoRA adapters on it: the critic, and the
  generator when it is a LoRA) and a full-weights generator. Each module of a repeated-block list (a
  ``nn.ModuleList`` named ``*blocks`` or ``layers``: TinyDiT ``blocks``, SD3/FLUX ``transformer_blocks`` /
  ``single_transformer_blocks``, UNet ``down_blocks``/``up_blocks``, Wan ``blocks``) is one FSDP unit; the rest of
  the network is the root unit. Parameters become ``DTensor`` shards (dim 0 split over the N ranks); each block is
  all-gathered for its forward/backward and freed after it (always: see :func:`shard_module`). Text encoders, VAEs and
  rewards stay replicated (frozen, and called a different number of times per rank: prompt caching).
* **optimiser states** are created from the sharded parameters, so AdamW's moments are sharded too.
* **gradients**: FSDP2 reduce-scatters (averages) them during ``backward``; :class:`FSDPContext` therefore skips
  the data-parallel all-reduce. Because ``backward`` is itself collective, the ranks first agree on whether the
  loss is finite (one all-reduce) and skip the update together (the NaN-streak logic stays in lockstep).
* **mixed precision** (``runtime.fsdp.param_dtype`` / ``reduce_dtype``, default ``auto``: no cast, each weight
  in its own dtype as in one process): a ``MixedPrecisionPolicy`` — the all-gathered parameters are cast to
  ``param_dtype`` for compute and gradients are reduced in ``reduce_dtype``; the sharded master weights and
  optimiser states keep their dtype.
* **checkpoints** go through :mod:`torch.distributed.checkpoint` (DCP): every rank writes its shards of the
  generator, critic, EMA and both AdamW states into ``step-…tmp/`` (``.metadata`` + ``__<rank>_0.distcp``);
  rank 0 then adds ``state.pt`` (counters, every rank's RNG states, optimiser hyper-parameters, world size,
  metric scalars, monitor state, every rank's prompt order), ``recipe.yaml`` and the ``COMPLETE`` manifest (SHA-256 of every file,
  ``"format": "dcp"``) and renames it into place (:func:`dmdr.train.checkpoint.write_checkpoint`). Loading goes
  into the *current* sharding, so a run resumed with another world size reads the same files (DCP reshards).
  A resume at the same world size is bitwise exact (weights, optimiser states and per-rank RNG states restored);
  at another world size the run goes on with fresh derived per-rank streams (as DDP). A single-process run
  (no torchrun) can resume a DCP checkpoint (the shards are read into whole tensors), and an FSDP2 run can
  resume a single-process (safetensors) checkpoint. Other readers (``dmdr sample``, ``rl.init``) get whole tensors
  through :class:`DCPTensors`.
* **export**: the generator (EMA) is all-gathered one tensor at a time to rank 0, which writes the usual formats.
* ``dmdr train --dry-run`` of an fsdp2 recipe runs unsharded without torchrun (:func:`dry_run_recipe`) and adds
  the per-GPU memory estimate (:func:`memory_lines`).
* **no code is unpickled**: DCP tensors are read with ``weights_only=True``; DCP's ``.metadata`` (a pickle) is
  read by :func:`_safe_reader`, whose unpickler (:class:`_MetadataUnpickler`) admits only DCP's own metadata classes, ``torch.Size``, dtypes and
  paths.

Refused with one line (:class:`~dmdr.train.distributed.DistributedError`): no torchrun launch, ``critic.lora:
null`` (a full critic copy is evaluated at weight-space interpolations through ``functional_call``, which needs
whole tensors), tasks other than ``dmdr``, ``runtime.fsdp`` options without fsdp2, and a torch without
``fully_shard``.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dmdr.train.distributed import DistContext, DistributedError

FORMAT = "dcp"
BLOCK_LIST_NAMES = ("layers",)   # besides any ModuleList whose name ends with "blocks"
_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


# ---- launch / context ---------------------------------------------------------------------------------------------
def torchrun_env() -> bool:
    """True when torchrun's rendezvous variables are set (also for ``--nproc_per_node 1``)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def check_layout(recipe) -> None:
    """One-line errors for what FSDP2 cannot run (before any weights are loaded)."""
    if getattr(recipe, "task", "dmdr") != "dmdr":
        raise DistributedError(f"runtime.distributed=fsdp2 is for task: dmdr, not task: {recipe.task}")
    critic = getattr(recipe, "critic", None)
    if critic is not None and critic.lora is None:
        raise DistributedError("runtime.distributed=fsdp2 does not support critic.lora: null (the full critic copy "
                               "is evaluated at weight interpolations that need whole tensors); use a LoRA critic "
                               "or runtime.distributed: ddp")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise DistributedError(f"runtime.distributed=fsdp2 needs torch.distributed.fsdp.fully_shard "
                               f"(torch >= 2.6); this torch is {torch.__version__}") from None


@dataclass
class FSDPContext(DistContext):
    """A :class:`DistContext` whose trainable parameters are FSDP2 shards (``sharded`` is True)."""

    mesh: Any = None

    @property
    def sharded(self) -> bool:
        return True

    def broadcast_(self, tensors, src: int = 0) -> None:
        """No-op: :func:`shard_bundle` broadcast the trainable weights before sharding them."""

    def average_grads_(self, params, *, poison: bool = False) -> None:
        """No-op for the averaging (FSDP2 reduce-scattered the gradients in ``backward``). ``poison`` (the ranks
        agreed the loss is non-finite and nobody ran ``backward``) sets every gradient to NaN, so the gradient
        norm is non-finite and the update is skipped on every rank."""
        if poison:
            for p in params:
                p.grad = torch.full_like(p, float("nan"))

    def agree_finite(self, finite: bool) -> bool:
        """True on every rank iff the loss is finite on every rank (``backward`` is collective under FSDP2)."""
        return not self.any(not finite)

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """:func:`torch.nn.utils.clip_grad_norm_` over sharded gradients; the total norm as a plain tensor."""
        gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return gn.full_tensor() if hasattr(gn, "full_tensor") else gn


def setup(recipe=None) -> FSDPContext:
    """Check the launch and the layout, initialise the process group (also for one process) and return the
    context. The device mesh is made by :func:`shard_bundle`, which knows the device."""
    if not torchrun_env():
        raise DistributedError("runtime.distributed=fsdp2 needs a torchrun launch: torchrun --nproc_per_node N -m "
                               "dmdr train RECIPE --out RUN (N >= 1)")
    if recipe is not None:
        check_layout(recipe)
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
        import atexit

        from dmdr.train.distributed import shutdown

        atexit.register(shutdown)
    return FSDPContext(mode="fsdp2", rank=dist.get_rank(), world_size=dist.get_world_size())


def check_options(recipe, mode: str) -> None:
    """``runtime.fsdp`` set away from its defaults without fsdp2 would do nothing: refuse it."""
    opts = getattr(getattr(recipe, "runtime", None), "fsdp", None)
    if opts is None or mode == "fsdp2":
        return
    changed = [k for k, v in opts.model_dump().items() if v != type(opts).model_fields[k].default]
    if changed:
        raise DistributedError(f"runtime.fsdp.{changed[0]} is set but the distributed mode is {mode}; set "
                               f"runtime.distributed: fsdp2 (under torchrun) or remove runtime.fsdp")


def check_task(recipe) -> None:
    """Tasks other than ``dmdr`` refuse ``runtime.distributed: fsdp2`` and ``runtime.fsdp`` options (one line)."""
    if getattr(recipe, "task", "dmdr") == "dmdr":
        return
    if getattr(getattr(recipe, "runtime", None), "distributed", None) == "fsdp2":
        raise DistributedError(f"runtime.distributed=fsdp2 is for task: dmdr, not task: {recipe.task}; remove it")
    check_options(recipe, "none")


def dry_run_recipe(recipe):
    """``dmdr train --dry-run`` of an fsdp2 recipe without torchrun builds everything in one process, unsharded
    (the launch check is for the real run); under torchrun, or for other modes, the recipe as it is."""
    from dmdr.train.distributed import mode_for

    if getattr(recipe, "task", None) != "dmdr" or torchrun_env() or mode_for(recipe) != "fsdp2":
        return recipe
    rt = recipe.runtime.model_copy(update={"distributed": "none", "fsdp": type(recipe.runtime.fsdp)()})
    return recipe.model_copy(update={"runtime": rt})


def memory_lines(recipe, est, worlds=(2, 4, 8)) -> list[str]:
    """Per-GPU peak memory under fsdp2 for N processes, from the one-GPU estimate ``est``
    (:func:`dmdr.train.memory_estimate.estimate_t2i_memory`, same parts and the same lower-bound caveats):

    * sharded, divided by N: the base network's weights, the trainable float32 weights (LoRAs, a full generator)
      and the optimiser (gradients + AdamW moments);
    * replicated: text encoders, VAE(s), reward models (``est.weights`` minus the sharded part);
    * gathered during a forward/backward: the root unit (the weights outside the block lists, held for the whole
      forward) plus two blocks (the current one and the prefetched next), in the base weights' dtype
      (``param_dtype`` when set);
    * activations: unchanged (``stages[*].batch_size`` is per process)."""
    from dmdr.models.standins import real_network
    from dmdr.train.memory_estimate import DTYPE_BYTES, GIB
    from dmdr.families.registry import get_family

    d = est.detail
    if not {"network_params", "lora_params", "full_generator_params"} <= set(d):
        return ["fsdp2 per GPU (estimate): not available for this family's memory estimate (no per-part parameter "
                "counts); the one-GPU line above is the unsharded peak"]
    wbytes = DTYPE_BYTES[recipe.model.dtype]
    pd = recipe.runtime.fsdp.param_dtype
    gbytes = wbytes if pd == "auto" else DTYPE_BYTES[pd]
    sharded = d["network_params"] * wbytes + 4 * (d["lora_params"] + d["full_generator_params"])
    replicated = est.weights - sharded
    net = real_network(get_family(recipe).config_name(recipe))
    blocks = block_modules(net)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in net.parameters() if id(p) not in in_blocks)
    biggest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    gathered = (root + 2 * biggest) * gbytes
    out = [f"fsdp2 per GPU (estimate): replicated {replicated / GIB:.1f} GiB + gathered {gathered / GIB:.1f} + "
           f"activations {est.activations / GIB:.1f} + sharded ({(sharded + est.optimiser) / GIB:.1f}) / N"]
    for n in worlds:
        total = replicated + gathered + est.activations + (sharded + est.optimiser) / n
        out.append(f"  N={n}: {total / GIB:.1f} GiB")
    return out


# ---- sharding -----------------------------------------------------------------------------------------------------
def block_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every element of the outermost ``nn.ModuleList``s named ``*blocks`` or
    ``layers`` (lists inside a chosen block are not split further)."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for name, child in m.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and (name.endswith("blocks")
                                                                    or name in BLOCK_LIST_NAMES):
                out.extend(child)
            else:
                visit(child)

    visit(module)
    return out


def mp_policy(recipe):
    """The ``MixedPrecisionPolicy`` of ``runtime.fsdp``: ``auto`` casts nothing (every weight computes in its own
    dtype and its gradient is reduced in it, as in one process: a bf16 frozen base stays bf16, LoRA/full trainable
    weights float32); ``fp32`` / ``bf16`` cast every gathered weight (``param_dtype``) or every reduced gradient
    (``reduce_dtype``) to that dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    o = recipe.runtime.fsdp
    return MixedPrecisionPolicy(param_dtype=_DTYPES[o.param_dtype], reduce_dtype=_DTYPES[o.reduce_dtype])


def shard_module(module: nn.Module, mesh, *, mp=None) -> int:
    """``fully_shard`` every block of ``module`` and then ``module`` itself (the root). Returns the unit count.

    Every unit, the root included, reshards after its forward (ZeRO-3). Not an option on purpose: the trainer runs
    ``no_grad`` forwards (backward simulation, the real/fake scores, sampling), after which a unit that does not
    reshard keeps its gathered copy until the next ``backward``, so the forward after an optimiser step would
    read stale weights and the optimiser's parameters would not be the module's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = mp or MixedPrecisionPolicy()
    blocks = block_modules(module)
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return len(blocks) + 1


def _names(module: nn.Module, params: list) -> list[str]:
    ids = {id(p): n for n, p in module.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in ids]
    if missing:
        raise DistributedError("fsdp2: a trainable parameter lives outside the module that holds it; this bundle "
                               "layout is not supported")
    return [ids[id(p)] for p in params]


def shard_bundle(bundle, recipe, ctx: FSDPContext, device: torch.device) -> None:
    """Shard ``bundle`` in place (see the module docstring) and point ``generator_params``/``critic_params`` at
    the new sharded parameters. Rank 0's trainable weights are broadcast first (one tensor at a time)."""
    from torch.distributed.device_mesh import init_device_mesh

    if bundle.critic_module is not None:
        raise DistributedError("runtime.distributed=fsdp2 does not support a full critic copy (critic.lora: null)")
    gen_owner = bundle.base if bundle.generator_is_lora else bundle.generator_module
    gen_names, critic_names = _names(gen_owner, bundle.generator_params), _names(bundle.base, bundle.critic_params)
    if ctx.world_size > 1:
        with torch.no_grad():
            for p in bundle.generator_params + bundle.critic_params:
                dist.broadcast(p.data, 0)
    ctx.mesh = init_device_mesh(device.type, (ctx.world_size,))
    mp = mp_policy(recipe)
    mods = [bundle.base] + ([] if bundle.generator_is_lora or bundle.generator_module is bundle.base
                            else [bundle.generator_module])
    for m in mods:
        shard_module(m, ctx.mesh, mp=mp)
    named_gen, named_base = dict(gen_owner.named_parameters()), dict(bundle.base.named_parameters())
    bundle.generator_params = [named_gen[n] for n in gen_names]
    bundle.critic_params = [named_base[n] for n in critic_names]


# ---- helpers over sharded tensors -----------------------------------------------------------------------------------
def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (an all-gather for a ``DTensor``: every rank must call it)."""
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu()


def full_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank: whole CPU tensors of a (sharded) state dict, in key order (collective)."""
    return {k: full(sd[k]) for k in sorted(sd)}


def local_non_finite(tensors: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    return sorted(n for n, sd in tensors.items()
                  if any(v.is_floating_point() and not bool(torch.isfinite(local(v)).all()) for v in sd.values()))


def _load_into(own: dict[str, torch.Tensor], src: dict[str, torch.Tensor], what: str) -> None:
    """Copy whole tensors ``src`` into (possibly sharded) ``own`` (every rank holds the whole tensor)."""
    from torch.distributed.tensor import distribute_tensor

    if set(own) != set(src):
        raise ValueError(f"{what} checkpoint does not match the model: missing {sorted(set(own) - set(src))[:3]}, "
                         f"unexpected {sorted(set(src) - set(own))[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            v = src[k]
            if tuple(v.shape) != tuple(t.shape):
                raise ValueError(f"{what} checkpoint: {k} has shape {tuple(v.shape)}, the model {tuple(t.shape)}")
            if is_dtensor(t) and is_dtensor(v):   # DCP loaded into the current sharding already
                t.to_local().copy_(v.to_local())
            elif is_dtensor(t):
                t.to_local().copy_(distribute_tensor(v.to(t.dtype), t.device_mesh, t.placements).to_local())
            else:
                t.copy_(v)


# ---- DCP checkpoints -----------------------------------------------------------------------------------------------
_META_MODULES = ("torch.distributed.checkpoint.metadata",)
_META_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                 ("pathlib", "Path"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` pickle, restricted to DCP's metadata classes, ``torch.Size``, dtypes and paths."""

    def find_class(self, module: str, name: str):
        if module in _META_MODULES or (module, name) in _META_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which is not allowed")


def _safe_reader(path):
    """A DCP ``FileSystemReader`` whose ``read_metadata`` uses :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


class DCPTensors(Mapping):
    """The whole tensors of a DCP checkpoint's ``generator`` / ``critic`` / ``ema`` as the ``{name: {key: tensor}}``
    mapping :func:`dmdr.train.checkpoint.read_checkpoint` returns for the single-process format; each group is
    read (in this process alone, no collective) the first time it is asked for, so a resume that reads the shards
    itself (:func:`load`) never pays for it, while ``dmdr sample`` or ``rl.init`` can use an FSDP2 run's
    checkpoint like any other."""

    GROUPS = ("generator", "critic", "ema")

    def __init__(self, path: Path):
        self.path = Path(path)
        self._meta = _safe_reader(self.path).read_metadata().state_dict_metadata
        self._names = [g for g in self.GROUPS if any(k.startswith(g + ".") for k in self._meta)]
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._cache:
            import warnings

            import torch.distributed.checkpoint as dcp

            want = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in self._meta.items()
                    if k.startswith(name + ".")}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(want, storage_reader=_safe_reader(self.path), no_dist=True)
            self._cache[name] = {k[len(name) + 1:]: v for k, v in want.items()}
        return self._cache[name]


def _opt_owner(tr, which: str) -> nn.Module:
    b = tr.bundle
    return b.generator_module if which == "opt_gen" else b.base


def _opt_tensors(tr, which: str) -> tuple[dict, list]:
    """(FQN-keyed AdamW state tensors, param_groups) of ``tr.<which>`` (DTensor shards under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opt = getattr(tr, which)
    if not opt.state:   # no step yet: save nothing rather than initialise the state (which would count a step)
        return {}, []
    sd = get_optimizer_state_dict(_opt_owner(tr, which), opt)
    return sd["state"], sd["param_groups"]


def payload(tr) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DCP tensors, plain extras for ``state.pt``): generator, critic, EMA, both optimisers' tensors."""
    tensors: dict[str, Any] = {"generator": dict(tr.bundle.generator_state()), "critic": dict(tr.bundle.critic_state())}
    if tr.ema is not None:
        tensors["ema"] = dict(tr.ema)
    extras: dict[str, Any] = {}
    for which in ("opt_gen", "opt_critic"):
        st, groups = _opt_tensors(tr, which)
        if st:
            tensors[which] = st
        extras[f"{which}_groups"] = groups
    return tensors, extras


def save(tr) -> Path | None:
    """:meth:`DMDRTrainer.save` under FSDP2 (every rank calls it): DCP shards from every rank, ``state.pt`` and the
    manifest from rank 0, then a barrier. Refuses (warning, None) on non-finite weights, as the plain save."""
    import torch.distributed.checkpoint as dcp

    from dmdr.recipes import recipe_to_yaml
    from dmdr.train import checkpoint as ckpt

    k, ctx = tr.state.global_step, tr.dist
    tensors, extras = payload(tr)
    bad = local_non_finite({n: tensors[n] for n in ("generator", "critic", "ema") if n in tensors})
    if ctx.any(bool(bad)):
        tr._warn(f"warning: not saving step {k}: non-finite weights in {', '.join(bad) or 'another rank'}")
        return None
    if not tr._student_outputs_finite():
        tr._warn(f"warning: not saving step {k}: the student's samples are non-finite (weights blew up)")
        return None
    state = tr.state_dict()
    for which in ("opt_gen", "opt_critic"):
        state.pop(which)
    state.update(extras)
    state["format"] = torch.tensor(1)
    state["rng_ranks"] = ctx.gather_tensor_dicts(state["rng"])
    data = tr.family.data_state(tr.bundle)
    if data is not None:  # every rank draws its own data order (T2I prompts): keep each one (state["data"] is rank 0's)
        state["data_ranks"] = ctx.gather_tensor_dicts(data_tensors(data))
    root = tr.out / "checkpoints"
    tmp = root / f"step-{k:07d}.tmp"
    err = None
    if ctx.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                ckpt._remove(tmp)
            tmp.mkdir()
        except OSError as e:
            err = e
    if ctx.any(err is not None):
        raise ckpt.CheckpointError(f"cannot write checkpoint step {k} in {root}: "
                                   f"{os.strerror(err.errno) if err and err.errno else 'see rank 0'}")
    ctx.barrier()
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    except Exception as e:  # noqa: BLE001 - DCP gathers every rank's failure (ENOSPC, EROFS...) into one exception
        if ctx.is_main:
            ckpt._remove(tmp)
        prior = [d for d in ckpt.list_checkpoints(root) if not d.name.endswith(".prev")]
        keep = f"the last complete checkpoint {prior[-1]} is intact" if prior else "no checkpoint was written yet"
        raise ckpt.CheckpointError(f"cannot write checkpoint step {k} in {root}: {ckpt._short(e)}; {keep}; free "
                                   f"space (or fix the file system) and continue with --resume") from None
    path, err = root / f"step-{k:07d}", None
    if ctx.is_main:
        try:
            path = ckpt.write_checkpoint(root, k, tensors={}, state=state, recipe_yaml=recipe_to_yaml(tr.recipe),
                                         keep_last=tr.recipe.logging.keep_last, tmp_ready=True,
                                         manifest_extra={"format": FORMAT, "world_size": ctx.world_size})
        except ckpt.CheckpointError as e:  # every rank raises (the others would wait for rank 0 forever)
            err = e
    if ctx.any(err is not None):
        raise err or ckpt.CheckpointError(f"cannot write checkpoint step {k} in {root}; see rank 0's error")
    ctx.barrier()
    tr._saved_step, tr._saved_inner = k, tr.state.inner_step
    return path


def load(tr, path: Path, tensors: dict, state: dict) -> None:
    """Load one checkpoint into the trainer: DCP (any world size, resharded) or the single-process format."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    import torch.distributed.checkpoint as dcp

    from dmdr.train.dmdr import DMDRState

    b = tr.bundle
    if is_dcp_checkpoint(path):
        target, _ = payload(tr)
        target.pop("opt_gen", None), target.pop("opt_critic", None)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        for which in ("opt_gen", "opt_critic"):
            if state.get(f"{which}_groups"):
                target[which] = get_optimizer_state_dict(_opt_owner(tr, which), getattr(tr, which))["state"]
        if tr.ema is None:
            target.pop("ema", None)
        import warnings

        with warnings.catch_warnings():  # a plain (no torchrun) resume: DCP's "load in a single process" notice
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, storage_reader=_safe_reader(path))
        bad = local_non_finite({n: target[n] for n in ("generator", "critic", "ema") if n in target})
        if tr.dist.any(bool(bad)):
            raise ValueError(f"non-finite weights in {', '.join(bad) or 'a shard of another rank'}")
        _load_into(dict(b.generator_state()), target["generator"], "generator")
        _load_into(dict(b.critic_state()), target["critic"], "critic")
        if tr.ema is not None:
            tr.ema = target["ema"] if "ema" in target else {k: v.detach().clone().float()
                                                             for k, v in b.generator_state().items()}
        for which in ("opt_gen", "opt_critic"):
            opt = getattr(tr, which)
            if which in target:
                set_optimizer_state_dict(_opt_owner(tr, which), opt,
                                         {"state": target[which], "param_groups": state[f"{which}_groups"]},
                                         options=StateDictOptions(strict=True))
            else:
                opt.state.clear()
    else:  # a single-process checkpoint: whole tensors, index-keyed optimiser states
        from dmdr.train.dmdr import non_finite

        bad = non_finite(tensors)
        if bad:
            raise ValueError(f"non-finite weights in {', '.join(bad)}")
        _load_into(dict(b.generator_state()), tensors["generator"], "generator")
        _load_into(dict(b.critic_state()), tensors["critic"], "critic")
        if tr.ema is not None:
            src = tensors.get("ema") or full_state(b.generator_state())
            tr.ema = {k: v.detach().clone().float() for k, v in b.generator_state().items()}
            _load_into(tr.ema, {k: v.float() for k, v in src.items()}, "ema")
        for which in ("opt_gen", "opt_critic"):
            _load_plain_optimizer(getattr(tr, which), state[which])
    tr.state = DMDRState.from_tensors(state["trainer"])
    _load_rest(tr, state)


def _load_plain_optimizer(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load an index-keyed optimiser state dict of whole tensors into an optimiser over (sharded) parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    st = {}
    for idx, s in sd["state"].items():
        p = params[int(idx)]
        st[idx] = {k: (distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
                       if is_dtensor(p) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v)
                   for k, v in s.items()}
    opt.load_state_dict({"state": st, "param_groups": sd["param_groups"]})


def data_tensors(d: dict) -> dict[str, torch.Tensor]:
    """A prompt sampler's state as tensors of fixed shapes (ints and bools as int64), for an all-gather."""
    return {k: (v.clone() if torch.is_tensor(v) else torch.tensor(int(v), dtype=torch.int64)) for k, v in d.items()}


def data_from_tensors(d: dict[str, torch.Tensor]) -> dict:
    return {k: (v if v.ndim else (bool(v) if k == "shuffle" else int(v))) for k, v in d.items()}


def data_state_for(state: dict, rank: int) -> dict | None:
    """The prompt-order state rank ``rank`` resumes from: its own when the checkpoint has one for it (any world
    size: rank r continues rank r's order), else None for a rank the checkpoint did not have (it keeps its fresh,
    rank-seeded order), else (a checkpoint without per-rank states) rank 0's ``state["data"]``."""
    ranks = state.get("data_ranks")
    if ranks is not None:
        return data_from_tensors(ranks[rank]) if rank < len(ranks) else None
    return state.get("data")


def _load_rest(tr, state: dict) -> None:
    """Data order, monitors, metric accumulator and RNG streams (as :meth:`DMDRTrainer.load`)."""
    from collections import defaultdict

    from dmdr.train.runtime import seed_everything, set_rng_state

    data = data_state_for(state, tr.dist.rank)
    if data is not None and tr.family.data_state(tr.bundle) is not None:
        tr.family.load_data_state(tr.bundle, data)
    if tr.monitor is not None and "monitors" in state:
        tr.monitor.bank.load_state_dict(state["monitors"])
    tr._acc = defaultdict(list, {k: [float(x) for x in v.tolist()] for k, v in state.get("metrics_acc", {}).items()})
    ranks, saved_world = state.get("rng_ranks"), int(state.get("world_size", 1))
    world = tr.dist.world_size
    if saved_world == world and ranks is not None and len(ranks) == world:
        set_rng_state(ranks[tr.dist.rank])
    elif saved_world == world == 1:
        set_rng_state(state["rng"])
    else:  # world size changed: fresh, distinct per-rank streams (the run goes on, not bitwise)
        seed_everything(tr.recipe.seed + tr.dist.rank + 1_000_003 * tr.state.global_step)
        tr.console(f"warning: the checkpoint was written by {saved_world} process(es), this run has {world}; "
                   f"per-rank RNG streams restart from a derived seed")


def export_student(tr, path: Path) -> Path | None:
    """:meth:`DMDRTrainer.export_student` under FSDP2: the generator (its EMA if enabled) is all-gathered one tensor
    at a time and only rank 0 keeps the whole tensors and writes them, in the single-process formats: digits, a
    standalone tiny-DiT file; text-to-image, the family's own export (LoRA folder or full network folder), through
    :meth:`~dmdr.families.base.Family.export` with the gathered tensors swapped in."""
    from dmdr.train.dmdr import TrainingStopped

    live = dict(tr.bundle.generator_state())
    bad = local_non_finite({"generator": live, **({"ema": tr.ema} if tr.ema is not None else {})})
    if tr.dist.any(bool(bad)):
        raise TrainingStopped(f"the student has non-finite weights ({', '.join(bad) or 'on another rank'}); nothing "
                              f"exported; lower the learning rates or use fp32")
    src, main, whole = (tr.ema if tr.ema is not None else live), tr.dist.is_main, {}
    for k in sorted(src):
        v = full(src[k])          # collective; the other ranks drop it at once
        if main:
            whole[k] = v
    if not main:
        return None
    owner = tr.bundle.base if tr.bundle.generator_is_lora else tr.bundle.generator_module
    return with_whole_parameters(owner, whole, lambda: tr.family.export(tr.bundle, path,
                                                                       global_step=tr.state.global_step))


def with_whole_parameters(module: nn.Module, whole: dict[str, torch.Tensor], fn):
    """Call ``fn()`` while the parameters named in ``whole`` (names as in ``module.named_parameters()``; other keys,
    e.g. buffers, are left alone) are plain tensors holding ``whole``'s values in the parameter's dtype; the original
    (sharded) parameters are restored afterwards. No collective: rank 0 alone may call it."""
    named, params = dict(module.named_modules()), dict(module.named_parameters())
    swapped = []
    try:
        for k, v in whole.items():
            if k not in params:
                continue
            mod_name, pname = k.rsplit(".", 1) if "." in k else ("", k)
            mod = named[mod_name]
            old = mod._parameters[pname]
            swapped.append((mod, pname, old))
            mod._parameters[pname] = nn.Parameter(v.to(old.dtype), requires_grad=False)
        return fn()
    finally:
        for mod, pname, old in reversed(swapped):
            mod._parameters[pname] = old
