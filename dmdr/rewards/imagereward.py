"""ImageReward (Xu et al., NeurIPS 2023, arXiv 2304.05977; code THUDM/ImageReward), reimplemented on transformers.

The model is BLIP: a ViT-L/16 image encoder and a BERT-base text encoder with cross-attention to the image tokens,
followed by an MLP head on the text [CLS] feature::

    v   = ViT(preprocess(x))                                   (B, 1 + (224/16)², 1024)
    h   = TextEncoder(ids(prompt), cross-attend to v)[:, 0]    (B, 768)
    r   = (MLP(h) - 0.16717362830052426) / 1.0333394966054072  (B,)
    MLP = Linear(768,1024) Drop Linear(1024,128) Drop Linear(128,64) Drop Linear(64,16) Linear(16,1)   (no activations)

``preprocess`` = bicubic resize of the short side to 224, center crop, CLIP mean/std (:mod:`.preprocess`); the
prompt is bert-base-uncased WordPiece padded to 35 tokens (:mod:`.tokenizers`). Images are (B, 3, H, W) in [0, 1];
the score is differentiable w.r.t. the pixels (ReFL, method.md §2.10).

Why not the ``image-reward`` package: it imports torchvision and openai ``clip`` and breaks under transformers 5
(docs/rewards.md). transformers' ``BlipVisionModel`` / ``BlipTextModel`` implement the same computation; only the
vision keys need renaming (:func:`remap_imagereward_state_dict`); the result matched the original modules to 0.0
max abs difference at full size (ecosystem check).

Loading real weights (a GPU box)::

    reward = build_reward("imagereward", checkpoint="/local/ImageReward.pt", tokenizer="/local/bert/vocab.txt",
                          device="cuda")

>>> from dmdr.rewards import build_reward
>>> import torch
>>> r = build_reward("imagereward", config="tiny", random_init=True)
>>> r(torch.rand(2, 3, 32, 32), ["a cat", "a dog"]).shape
torch.Size([2])
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from dmdr.errors import UserError
from dmdr.rewards.base import Reward, RewardSpec, register_reward
from dmdr.rewards.preprocess import clip_preprocess, parse_dtype, prompt_list
from dmdr.rewards.tokenizers import BERT_MAX_LENGTH, bert_token_ids, resolve_tokenizer

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the BLIP backbone and the MLP head. ``full`` is ImageReward v1.0 (ViT-L/16 + BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    vocab_size: int = 30524            # bert-base-uncased 30,522 + [DEC] + [ENC]
    max_positions: int = 512
    text_layer_norm_eps: float = 1e-12
    text_act: str = "gelu"
    mlp_dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)
    dropouts: tuple[float, ...] = field(default=(0.2, 0.2, 0.1))

    @staticmethod
    def named(name: str) -> "ImageRewardConfig":
        if name == "full":
            return ImageRewardConfig()
        if name == "tiny":
            return ImageRewardConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                                     vision_mlp=64, text_width=32, text_layers=2, text_heads=4, text_mlp=64,
                                     max_positions=64, mlp_dims=(32, 64, 32, 16, 8, 1))
        raise UserError(f"unknown ImageReward config {name!r}; expected 'full' or 'tiny'")

    def with_med_config(self, med: Mapping[str, Any]) -> "ImageRewardConfig":
        """Override the text-encoder sizes from BLIP's ``med_config.json`` (``encoder_width`` is the ViT width)."""
        import dataclasses

        keys = {"hidden_size": "text_width", "num_hidden_layers": "text_layers", "num_attention_heads": "text_heads",
                "intermediate_size": "text_mlp", "vocab_size": "vocab_size",
                "max_position_embeddings": "max_positions", "layer_norm_eps": "text_layer_norm_eps",
                "hidden_act": "text_act"}
        missing = [k for k in keys if k not in med]
        if missing:
            raise UserError(f"med_config is missing {', '.join(missing)}")
        upd = {ours: med[theirs] for theirs, ours in keys.items()}
        if upd["text_width"] != self.mlp_dims[0]:
            raise UserError(f"med_config hidden_size {upd['text_width']} does not match the MLP input "
                            f"{self.mlp_dims[0]}")
        return dataclasses.replace(self, **upd)


def _mlp(dims: Sequence[int], dropouts: Sequence[float]) -> nn.Sequential:
    """ImageReward's head: Linear layers at indices 0, 2, 4, 6, 7 with dropouts at 1, 3, 5, no activations."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dropouts):
            layers.append(nn.Dropout(dropouts[i]))
    return nn.Sequential(*layers)


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attention text encoder + MLP. Keys: ``vision.*``, ``text.*``, ``mlp.*``."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.cfg = cfg
        vcfg = BlipVisionConfig(hidden_size=cfg.vision_width, num_hidden_layers=cfg.vision_layers,
                                num_attention_heads=cfg.vision_heads, intermediate_size=cfg.vision_mlp,
                                image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=1e-6,
                                hidden_act="gelu", initializer_range=0.02)  # BLIP's 1e-10 default: dead random init
        tcfg = BlipTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width,
                              num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                              intermediate_size=cfg.text_mlp, encoder_hidden_size=cfg.vision_width,
                              max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.text_layer_norm_eps,
                              hidden_act=cfg.text_act, pad_token_id=0, is_decoder=True)  # is_decoder: build cross-attn
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        self.mlp = _mlp(cfg.mlp_dims, cfg.dropouts)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised pixels (B, 3, S, S), ids/mask (B, L) → standardised reward (B,)."""
        img = self.vision(pixel_values=pixel_values).last_hidden_state
        img_mask = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                      encoder_attention_mask=img_mask, is_decoder=False).last_hidden_state[:, 0]
        return ((self.mlp(h.float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


# ---- state-dict conversion -------------------------------------------------------------------------------------

# (official ViT substring, transformers BlipVisionModel substring), applied in order.
_VISION_RULES: tuple[tuple[str, str], ...] = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("blocks.", "encoder.layers."),
    ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
)
# Official keys that the score does not use (BLIP's contrastive projections, a legacy buffer).
IGNORED_OFFICIAL_PREFIXES: tuple[str, ...] = ("blip.vision_proj.", "blip.text_proj.",
                                              "blip.text_encoder.embeddings.position_ids")


def _vision_key_from_official(k: str) -> str:
    if k.startswith("norm."):
        return "post_layernorm." + k[len("norm."):]
    for a, b in _VISION_RULES:
        k = k.replace(a, b)
    return k


def _vision_key_to_official(k: str) -> str:
    if k.startswith("post_layernorm."):
        return "norm." + k[len("post_layernorm."):]
    for a, b in reversed(_VISION_RULES):
        k = k.replace(b, a)
    return k


def remap_imagereward_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Official ``ImageReward.pt`` keys → :class:`ImageRewardModel` keys.

    ``blip.visual_encoder.*`` → ``vision.*`` (timm ViT names → ``BlipVisionModel`` names),
    ``blip.text_encoder.*`` → ``text.*`` (names identical to ``BlipTextModel``), ``mlp.layers.*`` → ``mlp.*``.
    Returns ``(state_dict, unexpected)``; ``unexpected`` lists keys that fit none of these and are not known to be
    unused (``blip.vision_proj``, ``blip.text_proj``, the ``position_ids`` buffer).
    """
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for k, v in sd.items():
        if k.startswith(IGNORED_OFFICIAL_PREFIXES):
            continue
        if k.startswith("blip.visual_encoder."):
            out["vision." + _vision_key_from_official(k[len("blip.visual_encoder."):])] = v
        elif k.startswith("blip.text_encoder."):
            out["text." + k[len("blip.text_encoder."):]] = v
        elif k.startswith("mlp.layers."):
            out["mlp." + k[len("mlp.layers."):]] = v
        else:
            unexpected.append(k)
    return out, unexpected


def imagereward_state_dict_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`remap_imagereward_state_dict` (:class:`ImageRewardModel` keys → official keys)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("vision."):
            out["blip.visual_encoder." + _vision_key_to_official(k[len("vision."):])] = v
        elif k.startswith("text."):
            out["blip.text_encoder." + k[len("text."):]] = v
        elif k.startswith("mlp."):
            out["mlp.layers." + k[len("mlp."):]] = v
        else:
            raise UserError(f"not an ImageRewardModel key: {k!r}")
    return out


def _first(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_imagereward_checkpoint(model: ImageRewardModel, path: str | os.PathLike) -> None:
    """Load an official ``ImageReward.pt`` (or a state dict already in our key layout) strictly into ``model``."""
    if not os.path.isfile(path):
        raise UserError(f"ImageReward checkpoint not found: {path} (set kwargs.checkpoint on the reward term)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if any(k.startswith(("blip.", "mlp.layers.")) for k in sd):
        sd, unexpected = remap_imagereward_state_dict(sd)
    else:
        unexpected = []
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected += [k for k in sd if k not in own]
    if missing or unexpected:
        raise UserError(f"ImageReward checkpoint {path} does not match the model: missing [{_first(missing)}]; "
                        f"unexpected [{_first(unexpected)}]")
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise UserError(f"ImageReward checkpoint {path}: shape mismatch for {k}: checkpoint "
                        f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)} (config/med_config wrong?)")
    model.load_state_dict(sd, strict=True)


# ---- the reward ------------------------------------------------------------------------------------------------

class ImageReward(Reward):
    """ImageReward score of (B, 3, H, W) images in [0, 1] against B prompts → (B,). Differentiable.

    ``forward(images, prompts)``; ``prompts`` is a list of B strings (a single string is broadcast).
    """

    def __init__(self, model: ImageRewardModel, tokenizer: Any, max_length: int = BERT_MAX_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        if len(tokenizer) > model.cfg.vocab_size:
            raise UserError(f"ImageReward tokenizer has {len(tokenizer)} tokens but the text encoder only "
                            f"{model.cfg.vocab_size} rows")
        self.spec = RewardSpec(name="imagereward", differentiable=True, input_range=(0.0, 1.0),
                               resolution=model.cfg.image_size, reads_prompts=True)

    def score(self, images: Tensor, cond: Any) -> Tensor:
        prompts = prompt_list(cond, images.shape[0], self.spec.name)
        p = next(self.model.parameters())
        x = clip_preprocess(images, self.model.cfg.image_size, crop=True).to(device=p.device, dtype=p.dtype)
        ids, mask = bert_token_ids(self.tokenizer, prompts, self.max_length)
        return self.model(x, ids.to(p.device), mask.to(p.device)).to(images.device)


@register_reward("imagereward")
def build_imagereward(checkpoint: str | None = None, med_config: str | None = None, tokenizer: Any = None,
                      device: str = "cpu", config: str = "full", random_init: bool = False,
                      dtype: str = "float32") -> ImageReward:
    """Build ImageReward.

    Args:
        checkpoint: the official ``ImageReward.pt`` (THUDM/ImageReward on the hub); required unless ``random_init``.
        med_config: optional BLIP ``med_config.json`` overriding the text-encoder sizes.
        tokenizer: bert-base-uncased ``vocab.txt`` (or its directory, or a tokenizer object). Required for
            ``config="full"``; ``"tiny"`` falls back to a character-level test vocabulary.
        device, dtype: where and in which precision the frozen model runs (the MLP head runs in float32).
        config: ``"full"`` (ViT-L/16, 224 px) or ``"tiny"`` (random-weight tests, 32 px).
        random_init: build with random weights (tests, smoke runs); ``checkpoint`` must then be None.
    """
    cfg = ImageRewardConfig.named(config)
    if med_config is not None:
        with open(med_config, encoding="utf-8") as f:
            cfg = cfg.with_med_config(json.load(f))
    if checkpoint is None and not random_init:
        raise UserError("imagereward needs a checkpoint: set kwargs.checkpoint=/path/to/ImageReward.pt on the reward "
                        "term (or random_init: true for tests)")
    if checkpoint is not None and random_init:
        raise UserError("imagereward: give either checkpoint or random_init=True, not both")
    tok = resolve_tokenizer(tokenizer, kind="bert", tiny=(config == "tiny"))
    model = ImageRewardModel(cfg)
    if checkpoint is not None:
        load_imagereward_checkpoint(model, checkpoint)
    model.to(device=device, dtype=parse_dtype(dtype))
    model.mlp.float()
    return ImageReward(model, tok)


__all__ = ["IMAGEREWARD_MEAN", "IMAGEREWARD_STD", "ImageRewardConfig", "ImageRewardModel", "ImageReward",
           "remap_imagereward_state_dict", "imagereward_state_dict_to_official", "load_imagereward_checkpoint",
           "build_imagereward"]
