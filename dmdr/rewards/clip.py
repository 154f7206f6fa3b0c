"""CLIP-similarity rewards on transformers ``CLIPModel``: ``"clip"`` (e.g. DFN5B-CLIP-ViT-H-14), ``"hpsv2"`` (HPSv2.1).

The score is the cosine between the L2-normalised projected image and text features (method.md §2.10a)::

    f = normalize(W_v · ViT(preprocess(x))[cls])        (B, E), differentiable w.r.t. x
    t = normalize(W_t · TextTransformer(ids(prefix + prompt))[eot])   (B, E), no gradient
    r = scale · Σ_e f_e t_e                              (B,)

``scale = 1`` for "clip" and "hpsv2", as the official DMDR code calls ``clip_score(img, txt, logit_scale=1)``
(HPSv2's published numbers are 100 × this cosine). ``preprocess`` = bicubic antialiased resize to 224 × 224 +
CLIP mean/std; DMDR squashes the image (``crop=False``, ``rl_utils.CLIPImageProcessorTensor``), identical to
short-side resize + center crop on square images. Text: CLIP BPE padded to 77 (the official code uses the HF
tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); HPSv2 prepends ``"Realistic photo "`` in the official
DMDR ReFL scripts. Images are (B, 3, H, W) in [0, 1].

Checkpoints: an open_clip state dict (``open_clip_pytorch_model.bin``, ``HPS_v2.1_compressed.pt`` with a
``"state_dict"`` entry) is converted by :func:`convert_open_clip_state_dict`; an HF ``CLIPModel`` directory is
loaded with ``from_pretrained``. Why not the open_clip package: it needs torchvision and timm, which break a CPU
torch venv (docs/rewards.md).

Architecture note: the official DMDR code builds ``open_clip.create_model_and_transforms('ViT-H-14', path,
force_quick_gelu=False)`` for both DFN5B and HPSv2.1, i.e. exact GELU (``config="vit-h-14"``, the default).
DFN5B's own open_clip config says ``quick_gelu: true`` (``config="vit-h-14-quickgelu"``).

>>> from dmdr.rewards import build_reward
>>> import torch
>>> r = build_reward("hpsv2", config="tiny", random_init=True)
>>> r(torch.rand(2, 3, 32, 32), ["a cat", "a dog"]).shape
torch.Size([2])
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr.errors import UserError
from dmdr.rewards.base import Reward, RewardSpec, register_reward
from dmdr.rewards.preprocess import clip_preprocess, parse_dtype, prompt_list
from dmdr.rewards.tokenizers import CLIP_MAX_LENGTH, clip_token_ids, resolve_tokenizer

HPS_PREFIX = "Realistic photo "   # official DMDR train_sd3_refl_deepspeed.py


# ---- configurations -----------------------------------------------------------------------------------------

def clip_config(name: str):
    """A transformers ``CLIPConfig`` by name: ``vit-h-14`` (open_clip ViT-H-14, GELU), ``vit-h-14-quickgelu``,
    or ``tiny`` (random-weight tests: 32 px, width 32, the 514-token byte-level vocabulary)."""
    from transformers import CLIPConfig

    if name in ("vit-h-14", "vit-h-14-quickgelu"):
        act = "quick_gelu" if name.endswith("quickgelu") else "gelu"
        text = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act=act, layer_norm_eps=1e-5)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)
    if name == "tiny":
        text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, hidden_act="gelu", bos_token_id=512, eos_token_id=513,
                    pad_token_id=513)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8, hidden_act="gelu")
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    raise UserError(f"unknown CLIP config {name!r}; expected 'vit-h-14', 'vit-h-14-quickgelu' or 'tiny'")


# ---- open_clip <-> transformers state-dict conversion ------------------------------------------------------------

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RULES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
                "attn.out_proj.": "self_attn.out_proj."}
_TOP_RULES = {  # open_clip key -> CLIPModel key (no reshaping)
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED_OPEN_CLIP = ("attn_mask", "visual.attn_mask")   # causal-mask buffers some open_clip versions save


def unwrap_state_dict(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """``{"state_dict": sd}`` → ``sd``, and strip a DDP ``module.`` prefix."""
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def is_open_clip_state_dict(sd: Mapping[str, Any]) -> bool:
    return "visual.conv1.weight" in sd or "visual.class_embedding" in sd


def convert_open_clip_state_dict(sd: Mapping[str, Tensor], config: Any = None) -> dict[str, Tensor]:
    """open_clip ``CLIP`` (ViT towers, built-in text transformer) keys → transformers ``CLIPModel`` keys.

    ``attn.in_proj_weight/bias`` (3W, W) are split into ``q/k/v_proj``; ``visual.proj`` and ``text_projection``
    (W, E) are transposed into the (E, W) ``Linear`` weights; ``ln_1/ln_2/mlp.c_fc/mlp.c_proj/ln_pre/ln_post/ln_final``
    are renamed. With ``config`` (a ``CLIPConfig``), the tower widths and depths are checked. Keys that fit no rule
    raise ``ValueError`` (e.g. a SigLIP ``logit_bias`` or a custom text tower).
    """
    sd = unwrap_state_dict(sd)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        if k in _IGNORED_OPEN_CLIP:
            continue
        if k in _TOP_RULES:
            out[_TOP_RULES[k]] = v
        elif k in _TRANSPOSED:
            out[_TRANSPOSED[k]] = v.t().contiguous()
        elif (m := _BLOCK.match(k)) is not None:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                q, kk, vv = v.chunk(3, dim=0)
                out[prefix + f"self_attn.q_proj.{kind}"] = q.contiguous()
                out[prefix + f"self_attn.k_proj.{kind}"] = kk.contiguous()
                out[prefix + f"self_attn.v_proj.{kind}"] = vv.contiguous()
                continue
            for a, b in _BLOCK_RULES.items():
                if rest.startswith(a):
                    out[prefix + b + rest[len(a):]] = v
                    break
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"open_clip state dict has keys with no CLIPModel counterpart: {_first(unknown)}")
    if config is not None:
        _check_towers(out, config)
    return out


def open_clip_state_dict_from_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`convert_open_clip_state_dict` (``CLIPModel`` keys → open_clip keys)."""
    top = {v: k for k, v in _TOP_RULES.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK_RULES.items()}
    out: dict[str, Tensor] = {}
    pat = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k in transposed:
            out[transposed[k]] = v.t().contiguous()
        elif (m := pat.match(k)) is not None:
            prefix = ("visual." if m.group(1) == "vision_model" else "") + f"transformer.resblocks.{m.group(2)}."
            rest = m.group(3)
            qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if qkv is not None:
                if qkv.group(1) == "q":
                    base = m.group(0)[: -len(rest)] + "self_attn.{}_proj." + qkv.group(2)
                    out[prefix + f"attn.in_proj_{qkv.group(2)}"] = torch.cat([sd[base.format(c)] for c in "qkv"], 0)
                continue
            for b, a in block.items():
                if rest.startswith(b):
                    out[prefix + a + rest[len(b):]] = v
                    break
            else:
                raise UserError(f"no open_clip counterpart for {k!r}")
        else:
            raise UserError(f"no open_clip counterpart for {k!r}")
    return out


def _check_towers(sd: Mapping[str, Tensor], config: Any) -> None:
    checks = [("vision_model.embeddings.class_embedding", (config.vision_config.hidden_size,)),
              ("text_model.embeddings.token_embedding.weight",
               (config.text_config.vocab_size, config.text_config.hidden_size)),
              ("visual_projection.weight", (config.projection_dim, config.vision_config.hidden_size))]
    for key, shape in checks:
        if key in sd and tuple(sd[key].shape) != shape:
            raise UserError(f"checkpoint {key} has shape {tuple(sd[key].shape)}, config expects {shape} "
                            "(wrong config=?)")
    for tower, n in (("vision_model", config.vision_config.num_hidden_layers),
                     ("text_model", config.text_config.num_hidden_layers)):
        layers = {int(k.split(".")[3]) for k in sd if k.startswith(f"{tower}.encoder.layers.")}
        if layers and len(layers) != n:
            raise UserError(f"checkpoint {tower} has {len(layers)} layers, config expects {n} (wrong config=?)")


def _first(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True)``; unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"reward checkpoint not found: {p} (set kwargs.checkpoint on the reward term)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(p)))
    return unwrap_state_dict(torch.load(str(p), map_location="cpu", weights_only=True))


def load_clip_model(checkpoint: str | os.PathLike | None, config: str, *, random_init: bool = False,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", name: str = "clip"):
    """A frozen-to-be ``CLIPModel``: random (``random_init``), an HF directory, or an open_clip/HF state-dict file."""
    from transformers import CLIPModel

    if checkpoint is None and not random_init:
        raise UserError(f"{name} needs a checkpoint: set kwargs.checkpoint=/path (open_clip .bin/.pt or an HF "
                        "CLIPModel directory) on the reward term (or random_init: true for tests)")
    if checkpoint is not None and random_init:
        raise UserError(f"{name}: give either checkpoint or random_init=True, not both")
    if checkpoint is not None and Path(checkpoint).is_dir():
        model = CLIPModel.from_pretrained(str(checkpoint), local_files_only=True)
    else:
        cfg = clip_config(config)
        with torch.device(device):
            model = CLIPModel(cfg)
        if checkpoint is not None:
            sd = load_state_dict_file(checkpoint)
            sd = convert_open_clip_state_dict(sd, cfg) if is_open_clip_state_dict(sd) else sd
            own = model.state_dict()
            missing = [k for k in own if k not in sd]
            unexpected = [k for k in sd if k not in own]
            if missing or unexpected:
                raise UserError(f"{name} checkpoint {checkpoint} does not match config {config!r}: "
                                f"missing [{_first(missing)}]; unexpected [{_first(unexpected)}]")
            _check_towers(sd, cfg)
            model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=parse_dtype(dtype)).eval()


# ---- encoder + reward -------------------------------------------------------------------------------------------

class ClipEncoder(nn.Module):
    """L2-normalised CLIP features: ``encode_image`` (differentiable) and ``encode_text`` (no gradient).

    Any object with these two methods (and ``image_size``) can stand in for it (e.g. in tests).
    """

    def __init__(self, model: Any, tokenizer: Any, *, crop: bool = False, max_length: int = CLIP_MAX_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.crop = crop
        self.max_length = max_length
        self.image_size = int(model.config.vision_config.image_size)
        vocab = int(model.config.text_config.vocab_size)
        if len(tokenizer) > vocab:
            raise UserError(f"CLIP tokenizer has {len(tokenizer)} tokens but the text tower only {vocab} rows "
                            "(tokenizer and checkpoint do not belong together)")

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, E) unit vectors (float32)."""
        p = self._param()
        x = clip_preprocess(images, self.image_size, crop=self.crop).to(device=p.device, dtype=p.dtype)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """B strings → (B, E) unit vectors (float32); ids padded/truncated to 77, no attention mask (open_clip)."""
        ids = clip_token_ids(self.tokenizer, texts, self.max_length).to(self._param().device)
        pooled = self.model.text_model(input_ids=ids).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float()


class ClipScore(Reward):
    """``r = scale · cos(f_img, f_txt(prefix + prompt))`` for (B, 3, H, W) images in [0, 1] → (B,).

    ``use_logit_scale=True`` multiplies by the model's ``exp(logit_scale)`` (PickScore); otherwise scale = 1.
    """

    def __init__(self, encoder: ClipEncoder, *, name: str, prefix: str = "", use_logit_scale: bool = False):
        super().__init__()
        self.encoder = encoder
        self.prefix = prefix
        self.use_logit_scale = use_logit_scale
        self.spec = RewardSpec(name=name, differentiable=True, input_range=(0.0, 1.0),
                               resolution=encoder.image_size, reads_prompts=True)

    def score(self, images: Tensor, cond: Any) -> Tensor:
        prompts = prompt_list(cond, images.shape[0], self.spec.name)
        f = self.encoder.encode_image(images)
        t = self.encoder.encode_text([self.prefix + p for p in prompts])
        r = (f * t).sum(-1)
        if self.use_logit_scale:
            r = self.encoder.logit_scale() * r
        return r.to(images.device)


def build_clip_encoder(checkpoint: str | None, tokenizer: Any, config: str, random_init: bool, device: str,
                       dtype: str, crop: bool, name: str) -> ClipEncoder:
    default_dir = checkpoint if checkpoint is not None and Path(checkpoint).is_dir() else None
    # the tokenizer first: a missing one must fail before the (slow, large) model is built
    tok = resolve_tokenizer(tokenizer, kind="clip", default_dir=default_dir, tiny=(config == "tiny"))
    model = load_clip_model(checkpoint, config, random_init=random_init, device=device, dtype=dtype, name=name)
    return ClipEncoder(model, tok, crop=crop)


@register_reward("clip")
def build_clip(checkpoint: str | None = None, tokenizer: Any = None, config: str = "vit-h-14",
               random_init: bool = False, device: str = "cpu", dtype: str = "float32", prefix: str = "",
               crop: bool = False) -> ClipScore:
    """Plain CLIP cosine (DMDR: DFN5B-CLIP-ViT-H-14 ``open_clip_pytorch_model.bin``).

    Args:
        checkpoint: open_clip state dict (.bin/.pt/.safetensors) or an HF ``CLIPModel`` directory.
        tokenizer: directory with CLIP ``vocab.json`` + ``merges.txt`` (defaults to ``checkpoint`` when that is an HF
            directory shipping them; ``config="tiny"`` falls back to the byte-level test tokenizer).
        config: ``"vit-h-14"`` | ``"vit-h-14-quickgelu"`` | ``"tiny"`` (ignored for HF directories).
        prefix: prepended to every prompt. crop: short-side resize + center crop instead of squashing.
    """
    enc = build_clip_encoder(checkpoint, tokenizer, config, random_init, device, dtype, crop, "clip")
    return ClipScore(enc, name="clip", prefix=prefix)


@register_reward("hpsv2")
def build_hpsv2(checkpoint: str | None = None, tokenizer: Any = None, config: str = "vit-h-14",
                random_init: bool = False, device: str = "cpu", dtype: str = "float32", prefix: str = HPS_PREFIX,
                crop: bool = False) -> ClipScore:
    """HPSv2.1 (Wu et al., arXiv 2306.09341): open_clip ViT-H-14 fine-tuned; ``HPS_v2.1_compressed.pt``.

    Same arguments as ``"clip"``; ``prefix`` defaults to ``"Realistic photo "`` as in the official DMDR ReFL code
    (set ``prefix=""`` for the plain HPSv2 score).
    """
    enc = build_clip_encoder(checkpoint, tokenizer, config, random_init, device, dtype, crop, "hpsv2")
    return ClipScore(enc, name="hpsv2", prefix=prefix)


__all__ = ["HPS_PREFIX", "clip_config", "convert_open_clip_state_dict", "open_clip_state_dict_from_hf",
           "unwrap_state_dict", "is_open_clip_state_dict", "load_state_dict_file", "load_clip_model", "ClipEncoder",
           "ClipScore", "build_clip_encoder", "build_clip", "build_hpsv2"]
