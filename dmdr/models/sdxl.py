"""SDXL (diffusers ``UNet2DConditionModel``) behind the dmdr model contract.

Contract: ``denoiser(x_t (B,4,h,w), t (B,) ∈ [0,1], cond) -> ε̂ (B,4,h,w)`` with
``path = DDPMEps(scaled_linear_alphas_cumprod())`` (β from 0.00085 to 0.012, 1000 steps: SDXL's schedule).

* **Timestep.** The UNet receives the integer ``k = clamp(round(1000 t), 0, 999)`` (long), the same index
  :class:`dmdr.paths.DDPMEps` uses for ᾱ, so ``to_x0``/``renoise`` and the network agree by construction.
* **One step.** The DMD2/DMDR one-step generator is conditioned on timestep **399 with a pure-noise input**
  (``x̂0 = (ε - sqrt(1-ᾱ_399) ε̂) / sqrt(ᾱ_399)``, method.md §2.1, §2.13). In dmdr's continuous time this is
  ``t = SDXL_ONE_STEP_T = 0.399``; :func:`dmdr.models.t2i.t2i_grid` returns ``[0.399, 0]`` for one step.
* **Conditioning**: TensorDict ``prompt_embeds`` (B,77,2048), ``pooled_prompt_embeds`` (B,1280) and ``time_ids``
  (B,6) = (h, w, crop_top, crop_left, h, w) in pixels, passed as ``added_cond_kwargs={"text_embeds",
  "time_ids"}``. ``null_cond`` returns the *encoded empty prompt* ``""`` (both text embeddings) with ``cond``'s
  ``time_ids``, as the official code does (``compute_text_embeddings([""], ...)`` in
  ``train_t2i/sdxl/train_sdxl_refl_deepspeed.py``, which calls its own ``encode_prompt``, not the pipeline's, so
  diffusers' ``force_zeros_for_empty_prompt`` never applies). ``zero_empty_prompt=True`` on the encoder gives
  diffusers' inference default (zeros) instead.
* **LoRA scale**: dmdr scales its adapters through :func:`dmdr.models.lora.adapter_scope`; ``forward(...,
  lora_scale=s)`` forwards ``cross_attention_kwargs={"scale": s}`` for LoRAs loaded through diffusers.
* **Generator**: the official SDXL generator is a *full* fine-tune of DMD2's ODE-pretrained one-step UNet (a second
  network; the SDXL base stays teacher and critic base). dmdr expresses it with ``generator.lora: null`` and
  ``generator.init`` (:mod:`dmdr.families.diffusers_t2i`); a generator LoRA on the shared base is the other option.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr import keys as K
from dmdr.models.t2i_components import (POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, TIME_IDS, DiffusersDenoiser, LoraSpec,
                                        T2IComponents, TextEncoderStack, check_local_model_dir)
from dmdr.models.tiny_text import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae
from dmdr.paths import DDPMEps, scaled_linear_alphas_cumprod

SDXL_ONE_STEP_T = 0.399
"""Continuous time of the one-step SDXL generator: network timestep 399 on a pure-noise input."""

# the official critic targets (DMD2's SDXL LoRA set, method.md §3.1)
SDXL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def sdxl_timestep(t: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """The UNet timestep ``clamp(round(1000 t), 0, 999)`` as long (``DDPMEps.index``)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.clamp(torch.round(t * num_train_timesteps), 0, num_train_timesteps - 1).long()


class SDXLDenoiser(DiffusersDenoiser):
    """Wrap a diffusers ``UNet2DConditionModel`` (SDXL) as an ε-prediction denoiser (see the module docstring)."""

    family = "sdxl"
    network_subfolder = "unet"
    PIPELINE_CLASS = "StableDiffusionXLPipeline"
    DEFAULT_GENERATOR_LORA = LoraSpec(rank=64, alpha=128, target_modules=SDXL_LORA_TARGETS)
    DEFAULT_CRITIC_LORA = LoraSpec(rank=32, alpha=32, target_modules=SDXL_LORA_TARGETS)

    def __init__(self, unet: nn.Module, *, alphas_cumprod: Tensor | None = None):
        super().__init__(unet, DDPMEps(alphas_cumprod if alphas_cumprod is not None else scaled_linear_alphas_cumprod()))

    def network_timestep(self, t: Tensor) -> Tensor:
        return self.path.index(t)

    def forward(self, x_t: Tensor, t: Tensor, cond: TensorDict, *, lora_scale: float | None = None) -> Tensor:
        """ε̂(x_t, t, cond) in ``x_t``'s dtype. ``lora_scale`` → diffusers' ``cross_attention_kwargs``."""
        pe, pooled, t, dtype = self._forward_inputs(x_t, t, cond)
        time_ids = K.require(cond, TIME_IDS, fn="SDXLDenoiser", field="time_ids")
        out = self.net(x_t.to(dtype), self.network_timestep(t).to(x_t.device), encoder_hidden_states=pe.to(dtype),
                       added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
                       cross_attention_kwargs=None if lora_scale is None else {"scale": float(lora_scale)},
                       return_dict=False)[0]
        return out.to(x_t.dtype)

    def null_cond(self, cond: TensorDict) -> TensorDict:
        """Unconditional embeddings expanded to ``cond``'s batch, with ``cond``'s ``time_ids``."""
        out = self._null_batch(cond)
        if TIME_IDS in cond.keys():
            out[TIME_IDS] = cond[TIME_IDS]
        return TensorDict(out, batch_size=[cond.batch_size[0]], device=cond.device)

    def make_pipeline(self, vae: nn.Module, encoder: "SDXLTextEncoder", *, network: nn.Module | None = None):
        """A ``StableDiffusionXLPipeline`` over ``network`` (default: this denoiser's UNet) and the components."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
        return StableDiffusionXLPipeline(unet=network if network is not None else self.net, scheduler=sched, vae=vae,
                                         force_zeros_for_empty_prompt=encoder.zero_empty_prompt,
                                         **encoder.pipeline_components())


class SDXLTextEncoder(TextEncoderStack):
    """SDXL's text stack: CLIP-L (``CLIPTextModel``) + OpenCLIP-bigG (``CLIPTextModelWithProjection``).

    Mirrors ``StableDiffusionXLPipeline.encode_prompt`` (``clip_skip=None``): ``prompt_embeds = cat([h_L, h_G], -1)``
    from hidden state −2 of each, ``pooled = text_embeds`` of the second encoder; each tokenizer pads to its own
    ``model_max_length``. :meth:`size_cond` adds ``time_ids = (h, w, 0, 0, h, w)``.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, text_encoder_2: nn.Module, tokenizer_2, *,
                 zero_empty_prompt: bool = False):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.zero_empty_prompt = zero_empty_prompt
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TensorDict:
        prompts = list(prompts)
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds
        dtype = self.text_encoder_2.dtype
        return TensorDict({PROMPT_EMBEDS: torch.cat(hidden, dim=-1).to(dtype), POOLED_PROMPT_EMBEDS: pooled.to(dtype)},
                          batch_size=[len(prompts)], device=self.device)

    def null(self, negative_prompt: str = "") -> TensorDict:
        """The encoded ``negative_prompt`` (official); zeros only with ``zero_empty_prompt`` and an empty prompt."""
        td = self([negative_prompt])
        if self.zero_empty_prompt and negative_prompt == "":
            td = td.apply(torch.zeros_like)
        return td

    def size_cond(self, td: TensorDict, height: int, width: int) -> TensorDict:
        td = td.clone(False)
        B = td.batch_size[0]
        pe = td[PROMPT_EMBEDS]
        td[TIME_IDS] = sdxl_time_ids(height, width, B, dtype=pe.dtype, device=pe.device)
        return td

    def pipeline_components(self) -> dict:
        return dict(text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                    tokenizer_2=self.tokenizer_2)


def sdxl_time_ids(height: int, width: int, batch: int, *, dtype=torch.float32, device=None) -> Tensor:
    """SDXL micro-conditioning ``(h, w, 0, 0, h, w)`` (original size, crop, target size), shape (B, 6)."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device).expand(batch, 6)


# ---- factories ----------------------------------------------------------------------------------------------
TINY_SDXL_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
                        transformer_layers_per_block=(1, 1), use_linear_projection=True,
                        addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=16 + 6 * 8)


def build_tiny_sdxl(seed: int = 0, **denoiser_kwargs) -> T2IComponents:
    """Random-weight tiny SDXL (same classes as the real model): ~1M-param UNet on 4×8×8 latents, a factor-2 VAE
    (``scaling_factor=0.13025``, no shift, as SDXL's), ``CLIPTextModel`` (hidden 16) + ``CLIPTextModelWithProjection``
    (hidden 16, projection 16) with a byte-level tokenizer (8 tokens). Deterministic in ``seed``; the global RNG
    is left untouched.
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_CONFIG).eval()
        vae = tiny_vae(4, scaling_factor=0.13025, shift_factor=None)
        tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
        te = tiny_clip_text_encoder(tok, hidden_size=16, projection_dim=None)
        te2 = tiny_clip_text_encoder(tok2, hidden_size=16, projection_dim=16)
    vae.requires_grad_(False)
    encoder = SDXLTextEncoder(te, tok, te2, tok2)
    return T2IComponents("sdxl", SDXLDenoiser(unet, **denoiser_kwargs), vae, encoder, info={"tiny": True})


def _scheduler_alphas(root: Path) -> Tensor:
    """ᾱ from ``root/scheduler/scheduler_config.json`` (scaled_linear); SDXL's defaults when it is absent."""
    import json

    cfg_file = root / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        return scaled_linear_alphas_cumprod()
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"{cfg_file}: beta_schedule {cfg.get('beta_schedule')!r} is not supported (scaled_linear)")
    return scaled_linear_alphas_cumprod(cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
                                        cfg.get("num_train_timesteps", 1000))


def load_sdxl(path: str | Path | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              vae_path: str | Path | None = None, zero_empty_prompt: bool = False, field: str = "model.path",
              **denoiser_kwargs) -> T2IComponents:
    """Load SDXL from a local diffusers folder (``local_files_only=True``; nothing is downloaded).

    ``vae_path``: an optional local ``AutoencoderKL`` folder replacing ``path/vae`` (e.g. the fp16-fix VAE). A
    missing folder raises a one-line ``FileNotFoundError`` naming ``path`` and the recipe ``field``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = check_local_model_dir(path, field)
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, **kw)
    if vae_path is not None:
        vroot = Path(vae_path)
        if not vroot.is_dir():
            raise FileNotFoundError(f"model.vae_path={vae_path}: no such local folder")
        vae = AutoencoderKL.from_pretrained(vroot, torch_dtype=dtype, **kw)
    else:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    te2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype, **kw)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    tok2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw)
    encoder = SDXLTextEncoder(te, tok, te2, tok2, zero_empty_prompt=zero_empty_prompt)
    vae.requires_grad_(False).eval()
    if "alphas_cumprod" not in denoiser_kwargs:
        denoiser_kwargs["alphas_cumprod"] = _scheduler_alphas(root)
    comps = T2IComponents("sdxl", SDXLDenoiser(unet.eval(), **denoiser_kwargs), vae, encoder,
                          info={"path": str(root)})
    if device is not None:
        for m in (comps.denoiser, comps.vae, comps.encoder):
            m.to(device)
    return comps


__all__ = ["SDXLDenoiser", "SDXLTextEncoder", "SDXL_ONE_STEP_T", "SDXL_LORA_TARGETS", "sdxl_timestep",
           "sdxl_time_ids", "build_tiny_sdxl", "load_sdxl", "TINY_SDXL_CONFIG"]
