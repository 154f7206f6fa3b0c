"""The model-level pieces every diffusers text-to-image family supplies (docs/models.md, "the model contract").

* :class:`DiffusersDenoiser`: the base of the denoiser adapters (``SD3Denoiser``, ``SDXLDenoiser``, ...): holds the
  network ``net`` and its ``path``, caches the unconditional embeddings for ``null_cond``, and writes a LoRA the
  family's own diffusers pipeline loads (:meth:`DiffusersDenoiser.save_lora_weights`, through ``PIPELINE_CLASS``);
* :class:`TextEncoderStack`: the base of the per-family text encoders (prompts -> conditioning TensorDict);
* :class:`T2IComponents`: denoiser + VAE + text encoders, what a loader (``load_sd3``) or a stand-in returns;
* :class:`LoraSpec`, the adapter names :data:`GENERATOR` / :data:`CRITIC`, and loading helpers (local folders,
  full state dicts, a tiny reward VAE).

**Conditioning** is a :class:`tensordict.TensorDict` with batch size (B,): ``prompt_embeds`` (B,L,D),
``pooled_prompt_embeds`` (B,P) and, for SDXL, ``time_ids`` (B,6).

Only :mod:`dmdr.models` adapter files import diffusers; the core sees these models through the contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr import keys as K

# ---- conditioning keys (TensorDict) ------------------------------------------------------------------------
PROMPT_EMBEDS = "prompt_embeds"                # (B, L, D) token embeddings fed to cross/joint attention
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"  # (B, P) pooled text embedding
TIME_IDS = "time_ids"                          # (B, 6) SDXL micro-conditioning (h, w, top, left, h, w)

class DiffusersDenoiser(nn.Module):
    """Base of the diffusers adapters: holds the network ``net`` and the ``path``, and caches the unconditional
    (empty-prompt) embeddings that ``null_cond`` expands for CFG."""

    PIPELINE_CLASS: str = ""
    """The family's diffusers pipeline class name (its ``save_lora_weights`` writes the LoRA export)."""
    network_subfolder: str = "transformer"
    """The network's folder in a diffusers pipeline (``transformer`` / ``unet``)."""

    def __init__(self, net: nn.Module, path):
        super().__init__()
        self.net = net
        self.path = path
        self.register_buffer("_null_prompt_embeds", None, persistent=False)
        self.register_buffer("_null_pooled", None, persistent=False)

    @property
    def in_channels(self) -> int:
        """Latent channels of the wrapped network."""
        return int(self.net.config.in_channels)

    def _forward_inputs(self, x_t: Tensor, t: Tensor, cond: TensorDict) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
        """(prompt_embeds (B,L,D), pooled (B,P), t (B,), network dtype); missing keys are named errors."""
        fn = type(self).__name__
        pe = K.require(cond, PROMPT_EMBEDS, fn=fn, field="prompt_embeds")
        pooled = K.require(cond, POOLED_PROMPT_EMBEDS, fn=fn, field="pooled_prompt_embeds")
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return pe, pooled, t, next(self.net.parameters()).dtype

    def set_null_embeddings(self, null: TensorDict) -> None:
        """Cache the unconditional embeddings (batch 1, e.g. ``encoder([""])``) used by ``null_cond``."""
        self._null_prompt_embeds = null[PROMPT_EMBEDS][:1].detach().clone()
        self._null_pooled = null[POOLED_PROMPT_EMBEDS][:1].detach().clone()

    def _null_batch(self, cond: TensorDict) -> dict:
        """``{prompt_embeds (B,L,D), pooled_prompt_embeds (B,P)}`` of the cached null embeddings, B = cond's batch."""
        if self._null_prompt_embeds is None:
            raise RuntimeError(f"{type(self).__name__}.null_cond: no unconditional embeddings cached; call "
                               "set_null_embeddings(...) first (SharedBaseT2I does this)")
        B = cond.batch_size[0]
        return {PROMPT_EMBEDS: self._null_prompt_embeds.expand(B, -1, -1),
                POOLED_PROMPT_EMBEDS: self._null_pooled.expand(B, -1)}
    @classmethod
    def save_lora_weights(cls, out_dir: Path, state: dict[str, Tensor], metadata: dict | None) -> None:
        """Write ``state`` (peft keys) as ``out_dir/pytorch_lora_weights.safetensors`` with the pipeline class's
        own ``save_lora_weights`` (``<network_subfolder>_lora_layers``), so that its ``load_lora_weights`` reads it."""
        import diffusers

        if not cls.PIPELINE_CLASS:
            raise NotImplementedError(f"{cls.__name__} names no PIPELINE_CLASS: no LoRA export")
        pipe = getattr(diffusers, cls.PIPELINE_CLASS)
        pipe.save_lora_weights(out_dir, **{f"{cls.network_subfolder}_lora_layers": state,
                                           f"{cls.network_subfolder}_lora_adapter_metadata": metadata})

GENERATOR = "generator"
CRITIC = "critic"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA adapter: rank, alpha (scaling α/r), the target module names and peft's init."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    init: str | bool = "gaussian"


class TextEncoderStack(nn.Module):
    """Base class of the per-family text encoders: ``forward(prompts) -> TensorDict`` of embeddings, (B,).

    Subclasses implement :meth:`forward`, :meth:`null` (the unconditional embeddings, batch 1) and may add
    size conditioning in :meth:`size_cond` (SDXL ``time_ids``). All parameters are frozen.
    """

    def forward(self, prompts: Sequence[str]) -> TensorDict:  # pragma: no cover - abstract
        raise NotImplementedError

    def null(self, negative_prompt: str = "") -> TensorDict:
        """Unconditional embeddings (batch 1): the encoded ``negative_prompt`` (default ``""``)."""
        return self([negative_prompt])

    def size_cond(self, td: TensorDict, height: int, width: int) -> TensorDict:
        """Add resolution conditioning to ``td`` (no-op unless the family needs it)."""
        return td

    def pipeline_components(self) -> dict:
        """The text encoders and tokenizers as diffusers pipeline keyword arguments."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


@dataclass
class T2IComponents:
    """What a text-to-image family provides: the contract-satisfying denoiser, the VAE and the text encoders.

    Built by ``build_tiny_sd3`` / ``load_sd3`` (:mod:`dmdr.models.sd3`) and the SDXL equivalents.
    """

    family: str
    denoiser: nn.Module
    vae: nn.Module
    encoder: TextEncoderStack
    info: dict = field(default_factory=dict)

    def pipeline(self, network: nn.Module | None = None):
        """A diffusers pipeline (``StableDiffusion3Pipeline`` / ``StableDiffusionXLPipeline``) over these components.

        ``network`` replaces the denoiser's network (e.g. a clean copy of the base for a LoRA round trip).
        """
        return self.denoiser.make_pipeline(self.vae, self.encoder, network=network)


def load_network_weights(net: nn.Module, path: str | Path, field: str = "generator.init") -> nn.Module:
    """Load a full state dict into ``net`` in place (strict): a ``.safetensors`` file, a ``torch.save`` file
    (``.bin``/``.pt``, e.g. DMD2's ``sdxl_..._ode_pretraining_..._model_002000.bin``, read with
    ``weights_only=True``) or a diffusers model folder. Bad input raises a one-line error naming ``field``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{field}={path}: no such file or folder; pass a local state dict (.safetensors, "
                                f".bin) or diffusers model folder")
    if p.is_dir():
        try:
            state = type(net).from_pretrained(p, local_files_only=True).state_dict()
        except (OSError, ValueError, EnvironmentError) as e:
            raise ValueError(f"{field}={path}: not a {type(net).__name__} folder ({str(e).splitlines()[0][:120]})") \
                from None
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
            raise ValueError(f"{field}={path}: cannot read a state dict ({type(e).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{field}={path}: expected a state dict (name -> tensor)")
    from dmdr.models.weights import copy_state, state_mismatch

    own = net.state_dict()
    missing, unexpected, bad = state_mismatch(own, state)
    if missing or unexpected or bad:
        raise ValueError(f"{field}={path}: weights do not match the {type(net).__name__} of model.path "
                         f"(missing {missing[:2]}, unexpected {unexpected[:2]}, shape mismatch {bad[:2]})")
    copy_state(own, state)
    return net


def clean_network_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` with every LoRA adapter removed (the plain base), e.g. for a pipeline round trip."""
    clone = type(net).from_config(net.config)
    state = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if ".lora_" not in k}
    clone.load_state_dict(state)
    return clone.to(dtype=next(net.parameters()).dtype)


def check_local_model_dir(path: str | Path | None, field: str = "model.path") -> Path:
    """Validate a local diffusers pipeline folder; raise a one-line error naming ``path`` and the recipe field."""
    if path is None or str(path) == "":
        raise ValueError(f"{field} is not set: point it at a local diffusers folder (--set {field}=/local/dir)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{field}={path}: no such local folder (dmdr never downloads weights; "
                                f"set --set {field}=/local/dir)")
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{field}={path}: not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(root / "model_index.json", field, path)
    for comp in ("transformer", "unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        entry = index.get(comp)
        if isinstance(entry, list) and entry and entry[0] is not None:  # listed and not disabled (null)
            if not (root / comp / "config.json").is_file():
                raise ValueError(f"{field}={path}: model_index.json lists {comp} but {comp}/config.json is missing; "
                                 f"re-copy the model folder")
            _read_json(root / comp / "config.json", field, path)
    return root


def _read_json(f: Path, field: str, path) -> dict:
    """A JSON object from ``f``, or a one-line ValueError naming the file (invalid JSON, not an object)."""
    import json

    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{field}={path}: {f.relative_to(Path(path).expanduser())} is not valid JSON "
                         f"({e.__class__.__name__}); re-copy the model folder") from None
    if not isinstance(data, dict):
        raise ValueError(f"{field}={path}: {f.name} is not a JSON object; re-copy the model folder")
    return data




def load_tiny_autoencoder(path: str | Path, field: str = "model.reward_vae") -> nn.Module:
    """A local ``AutoencoderTiny`` folder (e.g. taesdxl) in eval mode; a missing folder is one line naming ``field``."""
    from diffusers import AutoencoderTiny

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{field}={path}: no such local folder; point it at an AutoencoderTiny folder "
                                f"(e.g. taesdxl) or set {field}: null")
    return AutoencoderTiny.from_pretrained(p, local_files_only=True).eval()


__all__ = ["PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "TIME_IDS", "GENERATOR", "CRITIC", "DiffusersDenoiser", "LoraSpec",
           "TextEncoderStack", "T2IComponents", "load_network_weights", "clean_network_copy", "check_local_model_dir",
           "load_tiny_autoencoder"]
