"""Z-Image / Z-Image-Turbo (diffusers ``ZImageTransformer2DModel``, ``ZImagePipeline``) behind the dmdr model contract.

Contract (``dmdr.models.contract``): ``denoiser(x_t (B,16,h,w), t (B,) ∈ [0,1], cond) -> velocity (B,16,h,w)`` with
``path = FlowMatching(t_min=0)``: ``x_t = (1 - t) x0 + t ε``, ``v = ε - x0``, ``x̂0 = x_t - t v``. Everything below was
read from diffusers 0.42.1's ``pipelines/z_image/pipeline_z_image.py`` and ``transformer_z_image.py``:

* **Timestep: the opposite convention.** The pipeline feeds ``timestep = (1000 - 1000 σ) / 1000 = 1 - σ`` (0 = noise,
  1 = clean; the network multiplies by ``t_scale = 1000`` itself). dmdr's t is σ (1 = noise), so the network time is
  ``1 - t`` (:func:`zimage_timestep`, float32).
* **Output sign.** The pipeline negates the network output before the Euler step (``noise_pred = -model_out``), so
  the network predicts ``x0 - ε`` and dmdr's velocity is ``v = -out``.
* **Latent layout.** Latents are (B, 16, H/8, W/8) (the FLUX VAE, factor 8), H and W multiples of 16 (patch 2). The
  network takes a *list* of per-sample (C, F=1, h, w) tensors and caption features as a list of (L_i, D) tensors
  (only the real tokens); it returns a list of (C, 1, h, w). This adapter converts from and to batched tensors.
* **Text encoding** (:class:`ZImageTextEncoder`, mirrors ``ZImagePipeline._encode_prompt``): each prompt is wrapped
  by the tokenizer's chat template (``[{"role": "user", "content": prompt}]``, ``add_generation_prompt=True``,
  ``enable_thinking=True``; with Qwen3's template this is ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>
  assistant\\n``), tokenised to ``max_sequence_length`` (512) with padding, run through the Qwen3 model with the
  attention mask, and the **second-to-last hidden state** (``hidden_states[-2]``) is kept at the unmasked positions.
  dmdr stores it padded: ``prompt_embeds`` (B, L, 2560) (zeros at padding) and ``prompt_mask`` (B, L) bool, so
  conditioning batches concatenate (CFG, groups); the adapter passes ``prompt_embeds[i][prompt_mask[i]]``.
* **Unconditional branch**: the encoded empty prompt ``""`` (the pipeline's default negative prompt).
* **CFG convention.** The pipeline's ``guidance_scale`` g means ``pos + g (pos - neg)``; dmdr's (and DMDR's) w means
  ``neg + w (pos - neg)``, so ``w = 1 + g``. Z-Image-Turbo is sampled with g = 0 (no CFG), 8 steps.
* **VAE**: ``image = VAE.decode(z / 0.3611 + 0.1159)`` (``scaling_factor``, ``shift_factor`` of the config), the
  shared :func:`dmdr.models.t2i.decode_latents`.
* **Grid.** The pipeline's sigmas are ``linspace(1, 1/N, N)`` shifted by the scheduler's shift 3 (Turbo,
  ``use_dynamic_shifting: false``), which is exactly dmdr's :func:`dmdr.schedules.few_step_grid` ``(N, 3, t_min=0)``
  (tested), so a student trained on dmdr's 8-step grid samples identically in ``ZImagePipeline``.
* **LoRA**: attention ``to_q, to_k, to_v, to_out.0`` of every block (noise/context refiners and main layers);
  the shared export (:func:`dmdr.models.t2i_export.export_lora_diffusers`, through ``PIPELINE_CLASS``) writes a
  file ``ZImagePipeline.load_lora_weights`` loads.

>>> comps = zimage_standin_components(seed=0)
>>> comps.denoiser(torch.randn(2, 16, 4, 4), torch.rand(2), comps.encoder(["a cat", "a dog"])).shape
torch.Size([2, 16, 4, 4])
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr import keys as K
from dmdr.models.t2i_components import (DiffusersDenoiser, PROMPT_EMBEDS, LoraSpec, T2IComponents, TextEncoderStack,
                                        check_local_model_dir)
from dmdr.paths import FlowMatching

CONFIG_FILE = Path(__file__).parent / "configs" / "z-image.json"
ZIMAGE_T_MIN = 0.0
PROMPT_MASK = "prompt_mask"   # (B, L) bool: which rows of prompt_embeds are real tokens
ZIMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ZIMAGE_MAX_SEQUENCE_LENGTH = 512
ZIMAGE_SCHEDULER_SHIFT = 3.0


def zimage_timestep(t: Tensor) -> Tensor:
    """The network time of Z-Image: ``1 - t`` in float32 (the network's 0 is noise; dmdr's t = 1 is noise)."""
    return 1.0 - t.float()


class ZImageDenoiser(DiffusersDenoiser):
    """Wrap a diffusers ``ZImageTransformer2DModel`` as a flow-matching denoiser (see the module docstring)."""

    family = "zimage"
    network_subfolder = "transformer"
    PIPELINE_CLASS = "ZImagePipeline"
    DEFAULT_GENERATOR_LORA = LoraSpec(rank=64, alpha=128, target_modules=ZIMAGE_LORA_TARGETS)
    DEFAULT_CRITIC_LORA = LoraSpec(rank=32, alpha=32, target_modules=ZIMAGE_LORA_TARGETS)

    def __init__(self, transformer: nn.Module, *, t_min: float = ZIMAGE_T_MIN):
        super().__init__(transformer, FlowMatching(t_min=t_min))
        self.register_buffer("_null_mask", None, persistent=False)

    def forward(self, x_t: Tensor, t: Tensor, cond: TensorDict, *, lora_scale: float | None = None) -> Tensor:
        """Velocity ``v(x_t, t, cond)`` (B,C,h,w) in ``x_t``'s dtype. ``lora_scale`` → ``joint_attention_kwargs``."""
        fn = type(self).__name__
        pe = K.require(cond, PROMPT_EMBEDS, fn=fn, field="prompt_embeds")
        mask = K.require(cond, PROMPT_MASK, fn=fn, field="prompt_mask").bool()
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        dtype = next(self.net.parameters()).dtype
        xs = list(x_t.to(dtype).unsqueeze(2).unbind(0))                       # B × (C, 1, h, w)
        caps = [pe[i][mask[i]].to(dtype) for i in range(x_t.shape[0])]      # B × (L_i, D)
        out = self.net(xs, zimage_timestep(t).to(x_t.device), caps, return_dict=False,
                       joint_attention_kwargs=None if lora_scale is None else {"scale": float(lora_scale)})[0]
        return (-torch.stack(list(out), 0).squeeze(2)).to(x_t.dtype)

    # -- unconditional branch -----------------------------------------------------------------------------------
    def set_null_embeddings(self, null: TensorDict) -> None:
        """Cache the empty-prompt embeddings and mask (batch 1) used by :meth:`null_cond`."""
        self._null_prompt_embeds = null[PROMPT_EMBEDS][:1].detach().clone()
        self._null_mask = null[PROMPT_MASK][:1].detach().clone()

    def null_cond(self, cond: TensorDict) -> TensorDict:
        """The empty-prompt embeddings and mask expanded to ``cond``'s batch (for CFG)."""
        if self._null_prompt_embeds is None:
            raise RuntimeError("ZImageDenoiser.null_cond: no unconditional embeddings cached; call "
                               "set_null_embeddings(...) first (SharedBaseT2I does this)")
        B = cond.batch_size[0]
        return TensorDict({PROMPT_EMBEDS: self._null_prompt_embeds.expand(B, -1, -1),
                           PROMPT_MASK: self._null_mask.expand(B, -1)}, batch_size=[B], device=cond.device)

    def make_pipeline(self, vae: nn.Module, encoder: "ZImageTextEncoder", *, network: nn.Module | None = None):
        """A ``ZImagePipeline`` over ``network`` (default: this denoiser's network) with the Turbo scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=ZIMAGE_SCHEDULER_SHIFT,
                                                use_dynamic_shifting=False)
        return ZImagePipeline(scheduler=sched, vae=vae, transformer=network if network is not None else self.net,
                              **encoder.pipeline_components())


class ZImageTextEncoder(TextEncoderStack):
    """Z-Image's text stack: a Qwen3 model and its tokenizer with the chat template (see the module docstring).

    ``forward(prompts)`` returns TensorDict(B) ``prompt_embeds`` (B, L, D) — ``hidden_states[-2]`` with padded rows
    set to 0 — and ``prompt_mask`` (B, L) bool, L = ``max_sequence_length``.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, *, max_sequence_length: int = ZIMAGE_MAX_SEQUENCE_LENGTH):
        super().__init__()
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.max_sequence_length = int(max_sequence_length)
        self.requires_grad_(False)
        self.eval()

    def chat(self, prompt: str) -> str:
        """The prompt as the pipeline wraps it (chat template, generation prompt, ``enable_thinking=True``)."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TensorDict:
        prompts = list(prompts)
        enc = self.tokenizer([self.chat(p) for p in prompts], padding="max_length", max_length=self.max_sequence_length,
                             truncation=True, return_tensors="pt")
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device).bool()
        h = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        h = h.masked_fill(~mask[..., None], 0.0)
        return TensorDict({PROMPT_EMBEDS: h, PROMPT_MASK: mask}, batch_size=[len(prompts)], device=self.device)

    def pipeline_components(self) -> dict:
        return dict(text_encoder=self.text_encoder, tokenizer=self.tokenizer)


# ---- configurations ---------------------------------------------------------------------------------------------
def zimage_config() -> dict:
    """The shipped real configuration ``dmdr/models/configs/z-image.json`` (a fresh copy)."""
    return json.loads(CONFIG_FILE.read_text())


def shrink_zimage_config() -> dict:
    """The real config shrunk in width and depth only: transformer dim 3840 → 64 (30 → 2 heads of 32, RoPE axes
    (32, 48, 48) → (8, 12, 12) to keep their sum = head dim), 30 → 2 layers, 2 → 1 refiner layer; Qwen3 2560 → 32
    wide (32/8 → 4/2 heads of 8), 36 → 2 layers, caption dim = its width; VAE (128, 256, 512, 512) → (8, 16, 32, 32),
    one resnet per block. Kept: every class, flag, latent channels (16), the 4 VAE levels (factor 8), patch sizes,
    qk-norm, eps, RoPE θ, t_scale, scaling/shift factors, the 512-token prompt length and the chat template call."""
    cfg = copy.deepcopy(zimage_config())
    te = cfg["text_encoder"]["config"]
    te.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8)
    cfg["network"].update(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, axes_dims=[8, 12, 12],
                          cap_feat_dim=te["hidden_size"])
    cfg["vae"].update(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4)
    return cfg


def _network(cfg: dict) -> nn.Module:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(**cfg["network"])


def real_zimage_network(*, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """The full-size Z-Image transformer with random weights (``meta``: shapes only, no memory)."""
    with torch.device(device):
        net = _network(zimage_config())
    return net.to(dtype) if dtype is not None else net


# The Qwen3 chat template reduced to what ZImagePipeline renders (user messages, a generation prompt, the
# enable_thinking=False branch); the stand-in tokenizer uses it, a real tokenizer folder brings its own template.
QWEN3_CHAT_TEMPLATE_SUBSET = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is "
    "defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def tiny_qwen_tokenizer(model_max_length: int = ZIMAGE_MAX_SEQUENCE_LENGTH):
    """A byte-level ``Qwen2Tokenizer`` (256 bytes + Qwen's special tokens, no merges) built in memory, with
    :data:`QWEN3_CHAT_TEMPLATE_SUBSET`; pads with ``<|endoftext|>`` like Qwen3. No download, no files."""
    from transformers import Qwen2Tokenizer

    from dmdr.rewards.tokenizers import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = QWEN3_CHAT_TEMPLATE_SUBSET
    return tok


def _qwen3(spec: dict, tokenizer) -> nn.Module:
    import transformers

    c = dict(spec["config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return getattr(transformers, spec["class"])(transformers.Qwen3Config(**c))


def zimage_standin_components(*, seed: int = 0, **denoiser_kwargs) -> T2IComponents:
    """Random-weight :class:`~dmdr.models.t2i.T2IComponents` from :func:`shrink_zimage_config` (frozen, eval mode):
    ``ZImageTransformer2DModel`` (≈ 0.6 M parameters), a Qwen3 ``Qwen3Model`` with a byte-level Qwen2 tokenizer,
    the FLUX-layout ``AutoencoderKL`` (factor 8; 64 px images ↔ 8×8 latents). Deterministic in ``seed``; the global
    RNG is left untouched."""
    from diffusers import AutoencoderKL

    cfg = shrink_zimage_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _network(cfg).eval()
        vae = AutoencoderKL(**cfg["vae"]).eval().requires_grad_(False)
        tok = tiny_qwen_tokenizer(cfg["max_sequence_length"])
        te = _qwen3(cfg["text_encoder"], tok).eval()
    encoder = ZImageTextEncoder(te, tok, max_sequence_length=cfg["max_sequence_length"])
    return T2IComponents("zimage", ZImageDenoiser(net, **denoiser_kwargs), vae, encoder,
                         info={"standin": "z-image", "config": cfg})


def load_zimage(path: str | Path | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                max_sequence_length: int = ZIMAGE_MAX_SEQUENCE_LENGTH, field: str = "model.path",
                **denoiser_kwargs) -> T2IComponents:
    """Load Z-Image(-Turbo) from a local diffusers folder (``transformer/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``; ``local_files_only=True``: nothing is downloaded). A missing folder is a one-line
    ``FileNotFoundError`` naming ``path`` and the recipe ``field``."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    root = check_local_model_dir(path, field)
    kw = dict(local_files_only=True)
    transformer = ZImageTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    te = AutoModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    encoder = ZImageTextEncoder(te, tok, max_sequence_length=max_sequence_length)
    vae.requires_grad_(False).eval()
    comps = T2IComponents("zimage", ZImageDenoiser(transformer.eval(), **denoiser_kwargs), vae, encoder,
                          info={"path": str(root)})
    if device is not None:
        for m in (comps.denoiser, comps.vae, comps.encoder):
            m.to(device)
    return comps


__all__ = ["PROMPT_MASK", "QWEN3_CHAT_TEMPLATE_SUBSET", "ZIMAGE_LORA_TARGETS", "ZIMAGE_MAX_SEQUENCE_LENGTH",
           "ZIMAGE_SCHEDULER_SHIFT", "ZIMAGE_T_MIN", "ZImageDenoiser", "ZImageTextEncoder", "load_zimage",
           "real_zimage_network", "shrink_zimage_config", "tiny_qwen_tokenizer", "zimage_config",
           "zimage_standin_components", "zimage_timestep"]
