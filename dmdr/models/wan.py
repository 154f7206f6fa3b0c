"""Wan2.1 text-to-video (diffusers ``WanTransformer3DModel`` + ``AutoencoderKLWan`` + UMT5) behind the dmdr model
contract, with latents that carry frames.

Contract (``dmdr.models.contract``): ``denoiser(x_t (B,16,F',h,w), t (B,) ∈ [0,1], cond) -> velocity (B,16,F',h,w)``
with ``path = FlowMatching(t_min=0)``: ``x_t = (1 - t) x0 + t ε``, ``v = ε - x0``, ``x̂0 = x_t - t v`` (Wan is trained
with rectified flow, the scheduler's ``prediction_type="flow_prediction"``). Every core function (paths, samplers,
DMD/fake-score/policy losses) reduces over all non-batch dims, so 5-D latents need no special case there.

* **Timestep.** The network receives ``1000 t`` as float32 (``round_timesteps=True``: ``round(1000 t)``). diffusers'
  ``UniPCMultistepScheduler(use_flow_sigmas=True)`` feeds ``int64(1000 σ)`` (truncated) at inference; the
  difference is below one timestep unit.
* **Shift.** Wan's inference time path is ``σ' = s σ / (1 + (s - 1) σ)`` (``flow_shift`` s = 3.0 at 480P, 5.0 at
  720P in WanPipeline's example). dmdr's few-step grid applies the same map (``dmdr.schedules.few_step_grid``), so
  the recipe's ``shift`` is Wan's ``flow_shift``.
* **Latents.** ``AutoencoderKLWan`` compresses 4× in time (``F' = (F - 1) // 4 + 1``, so F = 4k + 1) and 8× in space.
  Model latents are the VAE latents normalised per channel: ``z_model = (z - latents_mean) / latents_std``; decoding
  inverts it, ``z = z_model · latents_std + latents_mean`` (WanPipeline: ``latents / (1 / std) + mean``).
* **Conditioning** is a TensorDict with ``prompt_embeds`` (B, 512, 4096) only (no pooled embedding), made as
  ``WanPipeline._get_t5_prompt_embeds``: ``prompt_clean`` (ftfy when installed, HTML unescape, whitespace), UMT5
  on ``max_length=512`` padded tokens *with* the attention mask, then every position past the prompt's length set
  to zero. ``null_cond`` returns the embeddings of the negative prompt (``""`` by default, WanPipeline's default).
* **LoRA.** Targets: the q/k/v/out projections of self- and cross-attention (``attn1``/``attn2`` of every block).
  ``forward(..., lora_scale=s)`` passes ``attention_kwargs={"scale": s}`` (diffusers' path for pipeline-loaded
  LoRAs). :func:`export_wan_lora` writes a ``pytorch_lora_weights.safetensors`` that
  ``WanPipeline.load_lora_weights`` loads.

>>> comps = build_wan_standin(seed=0)
>>> cond = comps.encoder(["a digit moving right"])
>>> comps.denoiser(torch.randn(1, 16, 2, 8, 8), torch.rand(1), cond).shape
torch.Size([1, 16, 2, 8, 8])
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr import keys as K
from dmdr.models.t2i_components import (PROMPT_EMBEDS, DiffusersDenoiser, LoraSpec, T2IComponents, TextEncoderStack,
                                        check_local_model_dir)
from dmdr.models.t2i_export import LORA_WEIGHT_NAME, _lora_metadata
from dmdr.models.tiny_text import tiny_clip_tokenizer
from dmdr.paths import FlowMatching

WAN_NAME = "wan2.1-t2v-1.3b"
WAN_T_MIN = 0.0
WAN_MAX_SEQUENCE_LENGTH = 512
WAN_FLOW_SHIFT = 3.0
"""WanPipeline example's ``flow_shift`` for 480P (5.0 for 720P)."""
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WAN_FPS = 16
"""Frame rate of Wan2.1 clips (WanPipeline's example writes ``export_to_video(..., fps=16)``)."""


def wan_timestep(t: Tensor, *, rounded: bool = False) -> Tensor:
    """The network timestep of Wan: ``1000 t`` (float32), or ``round(1000 t)`` when ``rounded``."""
    s = t.float() * 1000.0
    return s.round() if rounded else s


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames of a clip of ``num_frames`` pixel frames: ``(F - 1) // 4 + 1``; F must be 4k + 1."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"num_frames must be {temporal_factor}k + 1 (1, 5, 9, ..., 81) for the Wan VAE, "
                         f"got {num_frames}")
    return (num_frames - 1) // temporal_factor + 1


class WanDenoiser(DiffusersDenoiser):
    """Wrap a diffusers ``WanTransformer3DModel`` as a flow-matching denoiser on (B, C, F', h, w) latents.

    Args:
        transformer: the network (stored as ``self.net``; LoRA adapters are injected into it).
        round_timesteps: feed ``round(1000 t)`` instead of ``1000 t``.
    """

    family = "wan"
    network_subfolder = "transformer"
    PIPELINE_CLASS = "WanPipeline"
    DEFAULT_GENERATOR_LORA = LoraSpec(rank=64, alpha=128, target_modules=WAN_LORA_TARGETS)
    DEFAULT_CRITIC_LORA = LoraSpec(rank=32, alpha=32, target_modules=WAN_LORA_TARGETS)

    def __init__(self, transformer: nn.Module, *, round_timesteps: bool = False):
        super().__init__(transformer, FlowMatching(t_min=WAN_T_MIN))
        self.round_timesteps = round_timesteps

    def network_timestep(self, t: Tensor) -> Tensor:
        return wan_timestep(t, rounded=self.round_timesteps)

    def forward(self, x_t: Tensor, t: Tensor, cond: TensorDict, *, lora_scale: float | None = None) -> Tensor:
        """Velocity ``v(x_t, t, cond)`` (B, C, F', h, w) in ``x_t``'s dtype; ``lora_scale`` → ``attention_kwargs``."""
        if x_t.ndim != 5:
            raise ValueError(f"WanDenoiser: x_t must be video latents (B, C, F, h, w); got {tuple(x_t.shape)}")
        pe = K.require(cond, PROMPT_EMBEDS, fn=type(self).__name__, field="prompt_embeds")
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        dtype = next(self.net.parameters()).dtype
        out = self.net(hidden_states=x_t.to(dtype), timestep=self.network_timestep(t).to(x_t.device),
                       encoder_hidden_states=pe.to(dtype),
                       attention_kwargs=None if lora_scale is None else {"scale": float(lora_scale)},
                       return_dict=False)[0]
        return out.to(x_t.dtype)

    # -- unconditional branch (no pooled embedding in Wan) -------------------------------------------------------
    def set_null_embeddings(self, null: TensorDict) -> None:
        """Cache the unconditional embeddings (batch 1, e.g. ``encoder([""])``) used by ``null_cond``."""
        self._null_prompt_embeds = null[PROMPT_EMBEDS][:1].detach().clone()

    def null_cond(self, cond: TensorDict) -> TensorDict:
        """The negative-prompt embeddings expanded to ``cond``'s batch (for CFG)."""
        if self._null_prompt_embeds is None:
            raise RuntimeError("WanDenoiser.null_cond: no unconditional embeddings cached; call "
                               "set_null_embeddings(...) first (SharedBaseT2I does this)")
        B = cond.batch_size[0]
        return TensorDict({PROMPT_EMBEDS: self._null_prompt_embeds.expand(B, -1, -1)}, batch_size=[B],
                          device=cond.device)

    def make_pipeline(self, vae: nn.Module, encoder: "WanTextEncoder", *, network: nn.Module | None = None,
                      flow_shift: float = WAN_FLOW_SHIFT):
        """A ``WanPipeline`` over ``network`` (default: this denoiser's network) and the components."""
        from diffusers import UniPCMultistepScheduler, WanPipeline

        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=flow_shift)
        return WanPipeline(transformer=network if network is not None else self.net, scheduler=scheduler, vae=vae,
                           **encoder.pipeline_components())


class WanTextEncoder(TextEncoderStack):
    """UMT5 as ``WanPipeline._get_t5_prompt_embeds`` uses it (see the module docstring).

    Output: TensorDict ``{prompt_embeds: (B, max_sequence_length, d_model)}``, zero past each prompt's length.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, *, max_sequence_length: int = WAN_MAX_SEQUENCE_LENGTH):
        super().__init__()
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.max_sequence_length = int(max_sequence_length)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TensorDict:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        prompts = [prompt_clean(p) for p in prompts]
        L = self.max_sequence_length
        tok = self.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, add_special_tokens=True,
                             return_attention_mask=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        out = self.text_encoder(tok.input_ids.to(self.device), mask).last_hidden_state
        keep = (torch.arange(L, device=out.device)[None] < mask.gt(0).sum(1, keepdim=True)).to(out.dtype)
        pe = out * keep[..., None]
        return TensorDict({PROMPT_EMBEDS: pe}, batch_size=[len(prompts)], device=self.device)

    def pipeline_components(self) -> dict:
        return dict(text_encoder=self.text_encoder, tokenizer=self.tokenizer)


# ---- VAE: per-channel normalisation -----------------------------------------------------------------------------
def _mean_std(vae: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def decode_wan_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Differentiable decode of model latents (B, 16, F', h, w) to a video (B, 3, F, 8h, 8w) in [0, 1], float32.

    ``video = clamp(VAE.decode(z_model · latents_std + latents_mean) / 2 + 1/2, 0, 1)``, F = 4 (F' - 1) + 1.
    """
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype)
    mean, std = _mean_std(vae, z)
    video = vae.decode(z * std + mean, return_dict=False)[0]
    return (video.float() / 2 + 0.5).clamp(0, 1)


def encode_wan_video(vae: nn.Module, video: Tensor, *, generator: torch.Generator | None = None,
                     sample: bool = True) -> Tensor:
    """Video (B, 3, F, H, W) in [0, 1] → model latents ``(z - latents_mean) / latents_std`` (posterior sample, or its
    mean when ``sample=False``)."""
    param = next(vae.parameters())
    dist = vae.encode((video * 2 - 1).to(device=param.device, dtype=param.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    mean, std = _mean_std(vae, z)
    return (z - mean) / std


# ---- export -------------------------------------------------------------------------------------------------
def export_wan_lora(net: nn.Module, out_dir: str | Path, *, adapter: str = "generator",
                    dtype: torch.dtype | None = None) -> Path:
    """Write the peft adapter ``adapter`` of the Wan transformer ``net`` as a diffusers LoRA folder.

    ``out_dir/pytorch_lora_weights.safetensors`` holds ``transformer.``-prefixed peft keys
    (``transformer.blocks.0.attn1.to_q.lora_A.weight``) and the LoRA config in the metadata, written by
    ``WanPipeline.save_lora_weights`` (:meth:`WanDenoiser.save_lora_weights`, the same path as the trainer's
    export). Load with ``WanPipeline.load_lora_weights(out_dir)``. Returns the file.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=adapter) if adapter in getattr(net, "peft_config", {}) \
        else {}
    if not state:
        raise ValueError(f"the Wan transformer has no LoRA adapter named {adapter!r}")
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    WanDenoiser.save_lora_weights(out, state, _lora_metadata(net, adapter))
    return out / LORA_WEIGHT_NAME


# ---- real config, stand-in, loader ------------------------------------------------------------------------------
def wan_real_config(name: str = WAN_NAME) -> dict:
    """The shipped real configuration (``dmdr/models/configs/<name>.json``), a fresh copy."""
    from dmdr.models.standins import real_config

    return real_config(name)


def shrink_wan_config(name: str = WAN_NAME) -> dict:
    """The real config shrunk in width and depth only.

    Transformer 12 heads × 128 → 2 × 12 (the 3-D RoPE splits a head into t/h/w parts: 12 → 4 + 4 + 4), ffn
    8960 → 32, 30 → 2 layers, ``text_dim``/UMT5 ``d_model`` 4096 → 32, ``freq_dim`` 256 → 32; UMT5 d_ff 10240 → 64,
    64 heads × 64 → 4 × 8, 24 → 2 layers; VAE ``base_dim`` 96 → 8, 2 → 1 res blocks. Kept: patch (1, 2, 2),
    16 latent channels, qk/cross-attn norms, eps, the VAE's 4 levels and temporal down-sampling (so ×8 space,
    ×4 time), ``latents_mean``/``latents_std``, UMT5's gated-gelu, dropout 0.1, buckets, ``max_sequence_length``.
    """
    cfg = copy.deepcopy(wan_real_config(name))
    cfg["network"].update(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32,
                          freq_dim=32)
    cfg["text_encoders"][0]["config"].update(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2)
    cfg["vae"].update(base_dim=8, num_res_blocks=1)
    return cfg


def build_wan_network(cfg: dict) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**cfg["network"])


def build_wan_vae(cfg: dict) -> nn.Module:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**cfg["vae"])


def _umt5(cfg: dict, tokenizer) -> nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    c = dict(cfg["text_encoders"][0]["config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
             eos_token_id=tokenizer.eos_token_id)
    return UMT5EncoderModel(UMT5Config(**c))


def build_wan_standin(seed: int = 0, *, name: str = WAN_NAME, max_sequence_length: int | None = None,
                      **denoiser_kwargs) -> T2IComponents:
    """Random-weight Wan components from :func:`shrink_wan_config` (same classes and flags as the real model).

    The tokenizer is the in-memory byte-level tokenizer with the real ``max_sequence_length`` (512) unless
    ``max_sequence_length`` is given (faster tests). Deterministic in ``seed``; the global RNG is left untouched.
    """
    cfg = shrink_wan_config(name)
    L = int(max_sequence_length or cfg["max_sequence_length"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_wan_network(cfg).eval()
        vae = build_wan_vae(cfg).eval().requires_grad_(False)
        tok = tiny_clip_tokenizer(L)
        te = _umt5(cfg, tok).eval()
    encoder = WanTextEncoder(te, tok, max_sequence_length=L)
    return T2IComponents("wan", WanDenoiser(net, **denoiser_kwargs), vae, encoder,
                         info={"standin": name, "config": cfg})


def real_wan_network(name: str = WAN_NAME, *, device: str | torch.device = "meta",
                     dtype: torch.dtype | None = None) -> nn.Module:
    """The full-size Wan transformer with random weights (``meta``: shapes only, no memory)."""
    with torch.device(device):
        net = build_wan_network(wan_real_config(name))
    return net.to(dtype) if dtype is not None else net


def load_wan(path: str | Path | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             vae_dtype: torch.dtype | None = torch.float32, max_sequence_length: int = WAN_MAX_SEQUENCE_LENGTH,
             field: str = "model.path", **denoiser_kwargs) -> T2IComponents:
    """Load Wan2.1 T2V from a local diffusers folder (``local_files_only=True``; nothing is downloaded).

    The VAE stays float32 by default (WanPipeline's example loads it in float32 under a bf16 transformer).
    A missing folder raises a one-line ``FileNotFoundError`` naming ``path`` and the recipe ``field``.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = check_local_model_dir(path, field)
    kw = dict(local_files_only=True)
    transformer = WanTransformer3DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, **kw)
    vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype or dtype, **kw)
    te = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    encoder = WanTextEncoder(te, tok, max_sequence_length=max_sequence_length)
    vae.requires_grad_(False).eval()
    comps = T2IComponents("wan", WanDenoiser(transformer.eval(), **denoiser_kwargs), vae, encoder,
                          info={"path": str(root)})
    if device is not None:
        for m in (comps.denoiser, comps.vae, comps.encoder):
            m.to(device)
    return comps


__all__ = ["WanDenoiser", "WanTextEncoder", "WAN_NAME", "WAN_FPS", "WAN_T_MIN", "WAN_FLOW_SHIFT", "WAN_LORA_TARGETS",
           "WAN_MAX_SEQUENCE_LENGTH", "wan_timestep", "latent_frames", "decode_wan_latents", "encode_wan_video",
           "export_wan_lora", "wan_real_config", "shrink_wan_config", "build_wan_network", "build_wan_vae",
           "build_wan_standin", "real_wan_network", "load_wan"]
