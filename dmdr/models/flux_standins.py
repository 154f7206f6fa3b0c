"""FLUX.1-dev and FLUX.2-klein at their real configurations: shrunk stand-ins and full-size meta networks.

``dmdr/models/configs/{flux1-dev,flux2-klein-4b,flux2-klein-9b}.json`` hold every component's real config (see
each file's ``_doc`` for what was and was not verified). :func:`shrink_flux_config` shrinks **only widths and
depths**: hidden sizes, heads, head dims (with the rotary axes split that must sum to the head dim), layer and block
counts. Every class, flag (``guidance_embeds``), activation, T5's dropout 0.1, the latent channels (16 / 32), the
VAE's four levels (factor 8), ``scaling_factor``/``shift_factor`` (FLUX.1), the batch-norm latent statistics
(FLUX.2), the tokenizer lengths (77 / 512 / 512) and the Qwen3 hidden-state layers (9, 18, 27: the stand-in Qwen3
keeps 28 of its 36 layers so that layer 27 exists) stay. Tokenizers are byte-level and built in memory.

:func:`flux_standin_components` → :class:`~dmdr.models.t2i.T2IComponents`; :func:`flux_real_network` → the
full-size network on the ``meta`` device (parameter counts, memory estimates).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dmdr.models.standins import real_config

FLUX_MODELS = ("flux1-dev", "flux2-klein-4b", "flux2-klein-9b")
QWEN_STANDIN_LAYERS = 28   # the smallest depth that keeps hidden-state layer 27

# a byte-level Qwen3 chat template: what Qwen3's template renders for one user message with
# add_generation_prompt=True and enable_thinking=False
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def shrink_flux_config(name: str) -> dict:
    """The real config of ``name`` shrunk in width and depth only (see the module docstring)."""
    cfg = copy.deepcopy(real_config(name))
    n = cfg["network"]
    vae = cfg["vae"]
    vae.update(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4)
    if cfg["family"] == "flux1":
        clip, t5 = cfg["text_encoders"]
        clip["config"] = {**clip["config"], "hidden_size": 16, "intermediate_size": 64, "num_attention_heads": 2,
                          "num_hidden_layers": 2, "projection_dim": 16}
        t5["config"] = {**t5["config"], "d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2}
        n.update(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                 axes_dims_rope=[4, 6, 6], joint_attention_dim=64, pooled_projection_dim=16)
    else:
        (q,) = cfg["text_encoders"]
        q["config"] = {**q["config"], "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "head_dim": 8, "num_hidden_layers": QWEN_STANDIN_LAYERS}
        n.update(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                 axes_dims_rope=[4, 4, 4, 4], joint_attention_dim=3 * 16)
    return cfg


def _network(cfg: dict) -> nn.Module:
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    cls = {"FluxTransformer2DModel": FluxTransformer2DModel, "Flux2Transformer2DModel": Flux2Transformer2DModel}
    return cls[cfg["network_class"]](**cfg["network"])


def build_flux_vae(cfg: dict) -> nn.Module:
    """The raw diffusers VAE of ``cfg`` (``AutoencoderKL`` for FLUX.1, ``AutoencoderKLFlux2`` for FLUX.2)."""
    import diffusers

    return getattr(diffusers, cfg["vae_class"])(**cfg["vae"])


def qwen3_standin_tokenizer(max_length: int = 512):
    """A byte-level ``Qwen2Tokenizer`` with Qwen3's special tokens and chat rendering, built in memory."""
    from transformers import Qwen2TokenizerFast

    from dmdr.rewards.tokenizers import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<think>", "</think>"]})
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def _qwen3(config: dict, tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = dict(config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
             eos_token_id=tokenizer.eos_token_id)
    return Qwen3ForCausalLM(Qwen3Config(**c))


def flux_standin_components(name: str, *, seed: int = 0, **denoiser_kwargs):
    """Random-weight :class:`~dmdr.models.t2i.T2IComponents` of ``name`` from :func:`shrink_flux_config`.

    FLUX.1: ``FluxDenoiser`` (guidance input = the config's 3.5), ``AutoencoderKL``, ``FluxTextEncoder`` (CLIP-L +
    T5 with dropout 0.1, 512 tokens). FLUX.2: ``Flux2Denoiser``, ``Flux2LatentVAE`` over an ``AutoencoderKLFlux2``
    whose batch-norm statistics are random (so the normalisation is exercised), ``Flux2KleinTextEncoder``.
    Encoders and VAE frozen and in eval mode; deterministic in ``seed``; the global RNG is untouched.
    """
    from dmdr.models.flux import (Flux2Denoiser, Flux2KleinTextEncoder, Flux2LatentVAE, FluxDenoiser,
                                  FluxTextEncoder)
    from dmdr.models.standins import _text_encoder
    from dmdr.models.t2i import T2IComponents, tiny_clip_tokenizer

    cfg = shrink_flux_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _network(cfg).eval()
        vae = build_flux_vae(cfg).eval().requires_grad_(False)
        if cfg["family"] == "flux1":
            tok = tiny_clip_tokenizer(cfg["tokenizer_max_length"])
            tok2 = tiny_clip_tokenizer(cfg["t5_max_sequence_length"])
            te, te2 = (_text_encoder(s, t).eval() for s, t in zip(cfg["text_encoders"], (tok, tok2)))
        else:
            with torch.no_grad():
                vae.bn.running_mean.normal_(0.0, 0.2)
                vae.bn.running_var.uniform_(0.5, 2.0)
            tok = qwen3_standin_tokenizer(cfg["tokenizer_max_length"])
            te = _qwen3(cfg["text_encoders"][0]["config"], tok).eval()
    info = {"standin": name, "config": cfg}
    if cfg["family"] == "flux1":
        encoder = FluxTextEncoder(te, tok, te2, tok2, max_sequence_length=cfg["t5_max_sequence_length"])
        den = FluxDenoiser(net, **{"guidance": cfg["guidance"], **denoiser_kwargs})
        return T2IComponents("flux1", den, vae, encoder, info=info)
    encoder = Flux2KleinTextEncoder(te, tok, max_sequence_length=cfg["tokenizer_max_length"],
                                    layers=cfg["text_encoder_layers"])
    return T2IComponents("flux2", Flux2Denoiser(net, **denoiser_kwargs), Flux2LatentVAE(vae), encoder, info=info)


def flux_real_network(name: str, *, device: str | torch.device = "meta", dtype: torch.dtype | None = None
                      ) -> nn.Module:
    """The full-size transformer of ``name`` with random weights (``meta``: shapes only, no memory)."""
    cfg = real_config(name)
    with torch.device(device):
        net = _network(cfg)
    return net.to(dtype) if dtype is not None else net


def flux_real_text_encoders(name: str, *, device: str | torch.device = "meta") -> list[nn.Module]:
    """The full-size text encoders of ``name`` (meta device), with their published vocabulary sizes."""
    import transformers

    cfg = real_config(name)
    out = []
    with torch.device(device):
        for spec in cfg["text_encoders"]:
            cls = getattr(transformers, spec["class"])
            conf_cls = {"CLIPTextModel": transformers.CLIPTextConfig, "T5EncoderModel": transformers.T5Config,
                        "Qwen3ForCausalLM": transformers.Qwen3Config}[spec["class"]]
            out.append(cls(conf_cls(**spec["config"])))
    return out


__all__ = ["FLUX_MODELS", "shrink_flux_config", "flux_standin_components", "flux_real_network",
           "flux_real_text_encoders", "build_flux_vae", "qwen3_standin_tokenizer", "QWEN3_CHAT_TEMPLATE"]
