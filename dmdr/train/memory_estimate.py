"""Peak GPU memory of a text-to-image DMDR recipe, estimated before anything is loaded (``dmdr train --dry-run``).

The estimate has three parts, in GiB (2**30 bytes):

* **weights** — the frozen base network, the text encoders and the VAE(s) in ``model.dtype`` (the SDXL VAE in
  float32 when the base is fp16), the reward models (ViT-H-14 CLIP towers, 986M parameters each; ImageReward
  447M) in ``model.dtype``, and the trainable weights in float32: both LoRA adapters and, for a full-weights
  generator (``generator.lora: null``), a second float32 network;
* **optimiser** — for every trainable float32 parameter a gradient (4 bytes) and AdamW's two moments (8 bytes):
  ``12 · N_trainable`` bytes;
* **activations** — the bytes that autograd saves for backward, per image, measured by tracing the *real*
  network (and VAE) on PyTorch's ``meta`` device (shapes only, no memory, no weights), with attention counted as
  a fused kernel does (query, key, value, output and the float32 log-sum-exp; never the S×S matrix), then times
  the batch. The peak is the larger of the critic update (one network forward with grad) and the generator
  update (one generator forward with grad, plus the differentiable reward decode when the stage has rewards).
  ``model.gradient_checkpointing`` / ``model.vae_gradient_checkpointing`` / ``model.reward_vae`` change these
  traces exactly as they change the run.

``weights + optimiser + activations`` is a lower bound of the real peak: the allocator's fragmentation, CUDA
context (~0.5 GiB), reward-model activations and temporary buffers come on top. Counts come from the shipped real
configurations (:mod:`dmdr.models.standins`), selected by ``model.config``.

>>> GIB == 2 ** 30
True
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

GIB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES_PER_PARAM = 4 + 8  # float32 gradient + AdamW exp_avg and exp_avg_sq
REWARD_PARAMS = {"clip": 986_109_416, "hpsv2": 986_109_416, "srpo": 986_109_416, "pickscore": 986_109_416,
                 "imagereward": 446_700_000}
"""Parameter counts of the learned rewards (open_clip ViT-H-14 towers; ImageReward's BLIP, shared/ecosystem.md)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory parts in bytes; :meth:`gib` converts. ``detail`` names each counted item."""

    weights: int
    optimiser: int
    activations: int
    detail: dict

    @property
    def total(self) -> int:
        return self.weights + self.optimiser + self.activations

    def gib(self) -> dict[str, float]:
        return {k: getattr(self, k) / GIB for k in ("weights", "optimiser", "activations", "total")}

    def line(self) -> str:
        g = self.gib()
        return (f"estimated peak GPU memory {g['total']:.1f} GiB = weights {g['weights']:.1f} + optimiser "
                f"{g['optimiser']:.1f} + activations {g['activations']:.1f} at real size ({self.detail['config']}, "
                f"{self.detail['resolution']} px; a lower bound, docs/scale.md)")


def adam_bytes(n_trainable: int) -> int:
    """Bytes of the gradient and AdamW state of ``n_trainable`` float32 parameters: ``12 · n``."""
    return ADAM_BYTES_PER_PARAM * int(n_trainable)


def lora_param_count(net: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters of a rank-``rank`` LoRA on the modules of ``net`` whose name ends with a target (peft's rule):
    ``r·(in + out)`` per Linear, ``r·(in·k·k + out)`` per Conv2d (A is a k×k conv, B a 1×1 conv)."""
    n = 0
    for name, m in net.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            n += rank * (m.in_channels * kh * kw + m.out_channels)
    return n


# ---- activation traces on the meta device -------------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """Attention whose backward keeps what a fused kernel keeps: q, k, v, the output and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - traces never run backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _fused_attention():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):  # keyword names as torch's (diffusers' dispatcher passes them)
        return _FusedAttention.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, parameters excluded."""
    skip = {p.untyped_storage()._cdata for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention():
        fn()
    return sum(seen.values())


def _meta(shape, dtype, **kw):
    return torch.empty(*shape, device="meta", dtype=dtype, **kw)


def trainable_param_counts(recipe, net, n_net: int) -> tuple[int, int]:
    """(LoRA parameters, full-generator parameters) a DMDR recipe trains on ``net`` (``n_net`` parameters): the
    critic LoRA, plus the generator LoRA or, with ``generator.lora: null``, every weight of a second network."""
    g = recipe.generator
    n_lora = lora_param_count(net, recipe.critic.lora.rank, recipe.critic.lora.targets)
    if g.lora is not None:
        n_lora += lora_param_count(net, g.lora.rank, g.lora.targets)
    return n_lora, (n_net if g.lora is None else 0)


def reward_param_count(recipe) -> int:
    """Parameters of the learned rewards the recipe's stages use (each distinct reward once, :data:`REWARD_PARAMS`)."""
    return sum(REWARD_PARAMS.get(r, 0) for r in {t.name for st in recipe.stages for t in st.rewards})


def network_activation_bytes(name: str, resolution: int, dtype: torch.dtype, *, checkpointing: bool,
                             text_tokens: int | None = None) -> tuple[int, int]:
    """(activation bytes of one image's forward with grad, parameter count) of the real network ``name``."""
    from dmdr.models.standins import real_config, real_network

    cfg = real_config(name)
    net = real_network(name, dtype=dtype).requires_grad_(True)
    if checkpointing:
        net.enable_gradient_checkpointing()
    n = cfg["network"]
    h = resolution // 8
    x = _meta((1, n["in_channels"], h, h), dtype)
    if cfg["family"] == "sd3":
        L = text_tokens if text_tokens is not None else 2 * 77  # CLIP 77 + T5 max_sequence_length
        fn = lambda: net(hidden_states=x, timestep=_meta((1,), torch.float32),  # noqa: E731
                         encoder_hidden_states=_meta((1, L, n["joint_attention_dim"]), dtype),
                         pooled_projections=_meta((1, n["pooled_projection_dim"]), dtype), return_dict=False)[0]
    else:
        pooled = n["projection_class_embeddings_input_dim"] - 6 * n["addition_time_embed_dim"]
        fn = lambda: net(x, _meta((1,), torch.long), encoder_hidden_states=_meta((1, 77, n["cross_attention_dim"]),  # noqa: E731
                                                                              dtype),
                         added_cond_kwargs={"text_embeds": _meta((1, pooled), dtype), "time_ids": _meta((1, 6), dtype)},
                         return_dict=False)[0]
    params = list(net.parameters())
    return saved_activation_bytes(fn, params), sum(p.numel() for p in params)


def vae_decode_activation_bytes(name: str, resolution: int, dtype: torch.dtype, *, checkpointing: bool,
                                tiny: bool = False) -> tuple[int, int]:
    """(activation bytes of one differentiable decode at ``resolution``, VAE parameter count)."""
    from dmdr.models.standins import build_reward_vae, build_vae, real_config

    cfg = real_config(name)
    with torch.device("meta"):
        vae = (build_reward_vae(cfg) if tiny else build_vae(cfg)).to(dtype)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    h = resolution // 8
    z = _meta((1, cfg["vae"]["latent_channels"], h, h), dtype, requires_grad=True)
    params = list(vae.parameters())
    return saved_activation_bytes(lambda: vae.decode(z, return_dict=False)[0], params), sum(p.numel() for p in params)


def text_encoder_params(name: str) -> int:
    """Parameters of the real text encoders of ``name`` (meta device)."""
    import transformers

    from dmdr.models.standins import real_config

    n = 0
    for spec in real_config(name)["text_encoders"]:
        cls = getattr(transformers, spec["class"])
        conf = (transformers.T5Config if spec["class"] == "T5EncoderModel" else transformers.CLIPTextConfig)(
            **spec["config"])
        with torch.device("meta"):
            n += sum(p.numel() for p in cls(conf).parameters())
    return n


def estimate_t2i_memory(recipe, name: str | None = None) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of a T2I DMDR recipe (see the module docstring); ``name`` is the shipped real
    configuration (default: the recipe family's, :meth:`~dmdr.families.diffusers_t2i.DiffusersT2IFamily.config_name`)."""
    from dmdr.models.standins import quiet_diffusers

    if name is None:
        from dmdr.families.registry import get_family

        name = get_family(recipe).config_name(recipe)
    with quiet_diffusers():  # "modules that should be kept in float32: []" from .to(dtype) on meta modules
        return _estimate(recipe, name)


def _estimate(recipe, name: str) -> MemoryEstimate:
    from dmdr.models.standins import real_config, real_network

    m = recipe.model
    cfg = real_config(name)
    wbytes = DTYPE_BYTES[m.dtype]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m.dtype]
    vae_bytes = 4 if (cfg["family"] == "sdxl" and m.dtype == "fp16") else wbytes
    res = m.resolution
    text_tokens = 77 + m.max_sequence_length if cfg["family"] == "sd3" and len(cfg["text_encoders"]) > 2 else 77
    act_net, n_net = network_activation_bytes(name, res, dtype, checkpointing=m.gradient_checkpointing,
                                              text_tokens=text_tokens)
    act_gen = act_net  # a full-weights generator runs under bf16 autocast: the same saved activations
    tiny = m.reward_vae is not None and "reward_vae" in cfg
    act_dec, n_vae = vae_decode_activation_bytes(name, res, dtype, checkpointing=m.vae_gradient_checkpointing)
    n_rvae = 0
    if tiny:
        act_dec, n_rvae = vae_decode_activation_bytes(name, res, dtype, checkpointing=m.vae_gradient_checkpointing,
                                                      tiny=True)
    n_text = text_encoder_params(name)
    net = real_network(name)
    n_lora, n_full = trainable_param_counts(recipe, net, n_net)
    n_reward = reward_param_count(recipe)
    text_on_gpu = not m.offload_idle
    weights = (n_net * wbytes + (n_text * wbytes if text_on_gpu else 0) + n_vae * vae_bytes + n_rvae * vae_bytes
               + n_reward * wbytes + 4 * (n_lora + n_full))
    optimiser = adam_bytes(n_lora + n_full)
    peak_act = 0
    for st in recipe.stages:
        B = st.batch_size
        critic = B * act_net
        generator = B * act_gen + (B * act_dec if st.rewards else 0)
        peak_act = max(peak_act, critic, generator)
    detail = {"config": name, "resolution": res, "network_params": n_net, "text_encoder_params": n_text,
              "vae_params": n_vae, "reward_vae_params": n_rvae, "reward_params": n_reward, "lora_params": n_lora,
              "full_generator_params": n_full, "activation_bytes_per_image_network": act_net,
              "activation_bytes_per_image_decode": act_dec, "text_encoders_on_gpu": text_on_gpu}
    return MemoryEstimate(weights=int(weights), optimiser=int(optimiser), activations=int(peak_act), detail=detail)


__all__ = ["MemoryEstimate", "estimate_t2i_memory", "adam_bytes", "lora_param_count", "saved_activation_bytes",
           "network_activation_bytes", "vae_decode_activation_bytes", "text_encoder_params", "GIB",
           "REWARD_PARAMS"]
