"""Text-to-image rewards: tiny random weights in the real checkpoint key layouts, offline.

Run with OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmdr.errors import UserError
from dmdr.rewards import Reward, RewardSpec, available_rewards, build_reward
from dmdr.rewards.clip import (HPS_PREFIX, clip_config, convert_open_clip_state_dict, open_clip_state_dict_from_hf)
from dmdr.rewards.imagereward import (IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageRewardConfig, ImageRewardModel,
                                      imagereward_state_dict_to_official, remap_imagereward_state_dict)
from dmdr.rewards.preprocess import CLIP_MEAN, CLIP_STD, center_crop, clip_preprocess, prompt_list, resize
from dmdr.rewards.srpo import NEGATIVE_WORDS, POSITIVE_WORDS, SrpoReward, srpo_reward
from dmdr.rewards.tokenizers import (MissingTokenizerError, bert_token_ids, byte_level_clip_tokenizer,
                                     clip_token_ids, load_bert_tokenizer, load_clip_tokenizer, tiny_bert_tokenizer,
                                     tiny_wordpiece_vocab)

PROMPTS = ["a red cat", "two dogs on a beach"]


def _images(b: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def _grad_wrt_pixels(reward: Reward, images: torch.Tensor, prompts) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    return x.grad


# ---- registry ---------------------------------------------------------------------------------------------------

def test_t2i_rewards_are_registered():
    assert {"imagereward", "clip", "hpsv2", "pickscore", "srpo", "plugin"} <= set(available_rewards())


# ---- preprocessing ----------------------------------------------------------------------------------------------

def test_preprocess_shapes_normalisation_and_gradient():
    x = _images(h=40, w=64).requires_grad_(True)
    y = clip_preprocess(x, 32, crop=True)
    assert y.shape == (2, 3, 32, 32)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # a constant image maps to (c - mean) / std after resize + crop
    c = torch.full((1, 3, 50, 30), 0.5)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(clip_preprocess(c, 16).mean(dim=(2, 3))[0], expected, atol=1e-5, rtol=0)


def test_resize_short_side_then_center_crop_like_torchvision():
    x = _images(b=1, h=20, w=40)
    r = resize(x, 10, crop=True)
    full = F.interpolate(x, size=(10, 20), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(r, full[..., :, 5:15])
    # crop and squash agree on square inputs; input_range maps [-1, 1] to [0, 1]
    s = _images(b=1, h=24, w=24)
    torch.testing.assert_close(resize(s, 16, crop=True), resize(s, 16, crop=False))
    torch.testing.assert_close(clip_preprocess(s * 2 - 1, 16, input_range=(-1.0, 1.0)), clip_preprocess(s, 16))
    assert center_crop(torch.zeros(1, 3, 7, 9), 4).shape == (1, 3, 4, 4)


def test_prompt_list_validation():
    assert prompt_list("x", 3, "r") == ["x", "x", "x"]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        prompt_list(["a", "b"], 3, "r")
    with pytest.raises(ValueError, match="reads prompts"):
        prompt_list(None, 2, "r")


# ---- tokenizers -------------------------------------------------------------------------------------------------

def test_bert_tokenizer_from_local_vocab_has_blip_specials(tmp_path):
    tok = tiny_bert_tokenizer(tmp_path)
    n = len(tiny_wordpiece_vocab())
    assert len(tok) == n + 2
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [n, n + 1]
    assert tok.bos_token == "[DEC]"
    ids, mask = bert_token_ids(tok, ["A cat."])
    assert ids.shape == mask.shape == (1, 35)
    cls, sep = tok.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    assert ids[0, 0] == cls and ids[0, int(mask[0].sum()) - 1] == sep and tok.unk_token_id not in ids[0].tolist()


def test_small_or_missing_vocab_is_a_one_line_error(tmp_path):
    tiny_bert_tokenizer(tmp_path)
    with pytest.raises(MissingTokenizerError, match=f"only {len(tiny_wordpiece_vocab())} tokens") as e:
        load_bert_tokenizer(tmp_path / "vocab.txt")
    assert "\n" not in str(e.value) and "tokenizer=" in str(e.value)
    with pytest.raises(MissingTokenizerError, match="vocab.txt not found"):
        load_bert_tokenizer(tmp_path / "nope" / "vocab.txt")
    assert isinstance(MissingTokenizerError("x"), ValueError) and isinstance(MissingTokenizerError("x"), UserError)


def test_byte_level_clip_tokenizer(tmp_path):
    tok = byte_level_clip_tokenizer(tmp_path)
    assert len(tok) == 514 and (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    ids = clip_token_ids(tok, ["a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [512, 320, 66, 64, 339, 513, 513]   # <sot> a</w> c a t</w> <eot> pad(eot)
    with pytest.raises(MissingTokenizerError, match="only 514 tokens"):
        load_clip_tokenizer(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(MissingTokenizerError, match="merges.txt not found"):
        load_clip_tokenizer(tmp_path, allow_small=True)


def test_full_size_reward_without_tokenizer_fails_before_building():
    with pytest.raises(MissingTokenizerError, match="tokenizer"):
        build_reward("imagereward", checkpoint="/nonexistent/ImageReward.pt")
    with pytest.raises(MissingTokenizerError, match="vocab.json"):
        build_reward("hpsv2", random_init=True, config="vit-h-14", tokenizer="/nonexistent/dir")


# ---- ImageReward ------------------------------------------------------------------------------------------------

def test_imagereward_full_size_official_key_layout():
    with torch.device("meta"):
        model = ImageRewardModel(ImageRewardConfig.named("full"))
    official = imagereward_state_dict_to_official(model.state_dict())
    assert len(official) == 620
    shapes = {"blip.visual_encoder.cls_token": (1, 1, 1024), "blip.visual_encoder.pos_embed": (1, 197, 1024),
              "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
              "blip.visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
              "blip.visual_encoder.norm.weight": (1024,),
              "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
              "blip.text_encoder.encoder.layer.11.crossattention.self.key.weight": (768, 1024),
              "mlp.layers.0.weight": (1024, 768), "mlp.layers.6.weight": (16, 64), "mlp.layers.7.weight": (1, 16)}
    for k, shape in shapes.items():
        assert tuple(official[k].shape) == shape, k
    back, unexpected = remap_imagereward_state_dict(official)
    assert unexpected == [] and set(back) == set(model.state_dict())


@pytest.fixture(scope="module")
def tiny_imagereward():
    torch.manual_seed(0)
    return ImageRewardModel(ImageRewardConfig.named("tiny")).eval()


def test_imagereward_load_official_format_score_and_gradient(tiny_imagereward, tmp_path):
    src = tiny_imagereward
    official = imagereward_state_dict_to_official(src.state_dict())
    official["blip.vision_proj.weight"] = torch.zeros(4, 32)         # present in the real file, unused by the score
    official["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    ckpt = tmp_path / "ImageReward.pt"
    torch.save(official, ckpt)
    tiny_bert_tokenizer(tmp_path)
    reward = build_reward("imagereward", checkpoint=str(ckpt), tokenizer=str(tmp_path / "vocab.txt"), config="tiny")
    assert reward.spec == RewardSpec("imagereward", differentiable=True, input_range=(0.0, 1.0), resolution=32,
                                     reads_prompts=True)
    assert all(not p.requires_grad for p in reward.parameters())
    x = _images()
    r = reward(x, PROMPTS)
    # the same computation by hand on the source modules: ViT -> cross-attn text [CLS] -> MLP -> standardise
    ids, mask = bert_token_ids(reward.tokenizer, PROMPTS)
    with torch.no_grad():
        img = src.vision(pixel_values=clip_preprocess(x, 32, crop=True)).last_hidden_state
        h = src.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=img,
                     encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long), is_decoder=False)
        h = h.last_hidden_state[:, 0]
        for i in (0, 2, 4, 6, 7):   # Linear layers of the official nn.Sequential; dropouts in between, no activation
            h = src.mlp[i](h)
    torch.testing.assert_close(r, (h[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, rtol=0, atol=0)
    g = _grad_wrt_pixels(reward, x, PROMPTS)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert not torch.equal(r, reward(x, PROMPTS[::-1]))   # the score reads the prompt


def test_imagereward_mismatched_checkpoint_lists_keys(tiny_imagereward, tmp_path):
    official = imagereward_state_dict_to_official(tiny_imagereward.state_dict())
    del official["mlp.layers.7.bias"]
    official["blip.visual_encoder.extra.weight"] = torch.zeros(1)
    torch.save(official, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing \[mlp\.7\.bias\]; unexpected \[vision\.extra\.weight\]"):
        build_reward("imagereward", checkpoint=str(tmp_path / "bad.pt"), config="tiny")
    with pytest.raises(ValueError, match="random_init"):
        build_reward("imagereward", config="tiny")


def test_imagereward_med_config_overrides_text_sizes(tmp_path):
    med = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48,
           "vocab_size": 200, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "encoder_width": 768, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    r = build_reward("imagereward", config="tiny", random_init=True, med_config=str(tmp_path / "med_config.json"))
    assert len(r.model.text.encoder.layer) == 1 and r.model.text.embeddings.word_embeddings.num_embeddings == 200
    assert r(_images(), PROMPTS).shape == (2,)


# ---- CLIP / HPSv2 -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(clip_config("tiny")).eval()


def _open_clip_reference(sd, pixels, ids, heads=4, patch=8):
    """open_clip's CLIP forward written from its state dict (nn.MultiheadAttention, GELU), for the conversion test."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    def block(x, p, mask):
        mha = nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
        mha.load_state_dict({name: sd[p + "attn." + name] for name in
                             ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        y = ln(x, p + "ln_1")
        x = x + mha(y, y, y, need_weights=False, attn_mask=mask)[0]
        y = F.gelu(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        return x + F.linear(y, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])

    n_v = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    n_t = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre")
    for i in range(n_v):
        x = block(x, f"visual.transformer.resblocks.{i}.", None)
    f = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    L = ids.shape[1]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(n_t):
        t = block(t, f"transformer.resblocks.{i}.", causal)
    e = ln(t, "ln_final")[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(f, dim=-1), F.normalize(e, dim=-1)


def test_open_clip_conversion_round_trip_and_key_layout(tiny_clip):
    hf = tiny_clip.state_dict()
    oc = open_clip_state_dict_from_hf(hf)
    assert tuple(oc["visual.transformer.resblocks.0.attn.in_proj_weight"].shape) == (96, 32)
    assert tuple(oc["visual.proj"].shape) == (32, 16) and tuple(oc["text_projection"].shape) == (32, 16)
    back = convert_open_clip_state_dict(oc, clip_config("tiny"))
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    with pytest.raises(ValueError, match="logit_bias"):
        convert_open_clip_state_dict({**oc, "logit_bias": torch.zeros(())})
    # full-size ViT-H-14: the open_clip layout has 686 entries with the published shapes
    from transformers import CLIPModel

    with torch.device("meta"):
        full = open_clip_state_dict_from_hf(CLIPModel(clip_config("vit-h-14")).state_dict())
    assert len(full) == 686
    assert tuple(full["visual.conv1.weight"].shape) == (1280, 3, 14, 14)
    assert tuple(full["visual.positional_embedding"].shape) == (257, 1280)
    assert tuple(full["visual.proj"].shape) == (1280, 1024) and tuple(full["text_projection"].shape) == (1024, 1024)
    assert tuple(full["transformer.resblocks.23.attn.in_proj_weight"].shape) == (3072, 1024)


def test_hpsv2_loads_open_clip_checkpoint_matches_source_and_reference(tiny_clip, tmp_path):
    oc = open_clip_state_dict_from_hf(tiny_clip.state_dict())
    torch.save({"state_dict": {"module." + k: v for k, v in oc.items()}}, tmp_path / "HPS_v2.1_compressed.pt")
    tok_dir = tmp_path / "tok"
    tok = byte_level_clip_tokenizer(tok_dir)
    reward = build_reward("hpsv2", checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"), tokenizer=str(tok_dir),
                          config="tiny")
    assert reward.spec == RewardSpec("hpsv2", differentiable=True, input_range=(0.0, 1.0), resolution=32,
                                     reads_prompts=True)
    x = _images()
    r = reward(x, PROMPTS)
    # exactly the source CLIPModel's cosine (DMDR: squash-resize, "Realistic photo " prefix)
    ids = clip_token_ids(tok, [HPS_PREFIX + p for p in PROMPTS])
    with torch.no_grad():
        px = clip_preprocess(x, 32, crop=False)
        f = F.normalize(tiny_clip.visual_projection(tiny_clip.vision_model(pixel_values=px).pooler_output), dim=-1)
        t = F.normalize(tiny_clip.text_projection(tiny_clip.text_model(input_ids=ids).pooler_output), dim=-1)
        f_ref, t_ref = _open_clip_reference(oc, px, ids)
    torch.testing.assert_close(r, (f * t).sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(r, (f_ref * t_ref).sum(-1), rtol=1e-5, atol=1e-5)   # independent open_clip forward
    g = _grad_wrt_pixels(reward, x, PROMPTS)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_clip_from_hf_directory_and_plain_prompt(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path)
    byte_level_clip_tokenizer(tmp_path)   # the directory ships its tokenizer files, as HF repos do
    reward = build_reward("clip", checkpoint=str(tmp_path), config="tiny")
    x = _images()
    ids = clip_token_ids(reward.encoder.tokenizer, PROMPTS)
    with torch.no_grad():
        f = F.normalize(tiny_clip.visual_projection(
            tiny_clip.vision_model(pixel_values=clip_preprocess(x, 32, crop=False)).pooler_output), dim=-1)
        t = F.normalize(tiny_clip.text_projection(tiny_clip.text_model(input_ids=ids).pooler_output), dim=-1)
    torch.testing.assert_close(reward(x, PROMPTS), (f * t).sum(-1), rtol=1e-6, atol=1e-6)
    assert reward.spec.name == "clip" and reward.prefix == ""


def test_mismatched_clip_checkpoint_lists_keys(tiny_clip, tmp_path):
    hf = dict(tiny_clip.state_dict())
    del hf["text_projection.weight"]
    torch.save(hf, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing \[text_projection\.weight\]"):
        build_reward("clip", checkpoint=str(tmp_path / "bad.pt"), config="tiny")


# ---- PickScore --------------------------------------------------------------------------------------------------

def test_pickscore_is_logit_scale_times_cosine(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "pick")
    tok_dir = tmp_path / "tok"
    byte_level_clip_tokenizer(tok_dir)
    reward = build_reward("pickscore", checkpoint=str(tmp_path / "pick"), tokenizer=str(tok_dir), config="tiny")
    assert reward.spec.name == "pickscore" and reward.spec.differentiable and reward.spec.resolution == 32
    x = _images(h=40, w=56)
    ids = clip_token_ids(reward.encoder.tokenizer, PROMPTS)
    with torch.no_grad():
        px = clip_preprocess(x, 32, crop=True)    # CLIPProcessor: short side + center crop
        f = F.normalize(tiny_clip.visual_projection(tiny_clip.vision_model(pixel_values=px).pooler_output), dim=-1)
        t = F.normalize(tiny_clip.text_projection(tiny_clip.text_model(input_ids=ids).pooler_output), dim=-1)
    expected = tiny_clip.logit_scale.exp() * (f * t).sum(-1)
    torch.testing.assert_close(reward(x, PROMPTS), expected, rtol=1e-6, atol=1e-5)
    g = _grad_wrt_pixels(reward, x, PROMPTS)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ---- SRPO -------------------------------------------------------------------------------------------------------

class _FixedEncoder(nn.Module):
    """Unit features: the image feature is fixed; a text feature depends only on the control word."""

    image_size = 8

    def __init__(self):
        super().__init__()
        self.texts: list[str] = []
        self.words = {w: F.normalize(torch.randn(4, generator=torch.Generator().manual_seed(i)), dim=0)
                      for i, w in enumerate(POSITIVE_WORDS + NEGATIVE_WORDS)}
        self.f = F.normalize(torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 1.0, 1.0]]), dim=-1)

    def encode_image(self, images):
        return self.f * images.mean(dim=(1, 2, 3), keepdim=False)[:, None] * 2   # images are 0.5 -> the fixed f

    def encode_text(self, texts):
        self.texts += list(texts)
        return torch.stack([self.words[t.split(". ")[0]] for t in texts])


def test_srpo_formula_against_hand_computation():
    enc = _FixedEncoder()
    reward = SrpoReward(enc, k=0.1, seed=123)
    x = torch.full((2, 3, 8, 8), 0.5)
    r = reward(x, PROMPTS)
    pos, neg = reward.last_words
    assert pos in POSITIVE_WORDS and neg in NEGATIVE_WORDS
    assert enc.texts == [f"{pos}. {p}" for p in PROMPTS] + [f"{neg}. {p}" for p in PROMPTS]
    tp, tn = enc.words[pos], enc.words[neg]
    by_hand = torch.tensor([sum(float(enc.f[b, e]) * (1.1 * float(tp[e]) - float(tn[e])) for e in range(4))
                            for b in range(2)])
    torch.testing.assert_close(r, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(srpo_reward(enc.f, tp.expand(2, 4), tn.expand(2, 4), 0.0),
                               enc.f @ (tp - tn))
    assert reward.spec.name == "srpo" and reward.spec.differentiable and reward.spec.reads_prompts


def test_srpo_word_draws_are_seeded():
    a, b = SrpoReward(_FixedEncoder(), seed=7), SrpoReward(_FixedEncoder(), seed=7)
    draws_a = [a.draw_words() for _ in range(20)]
    assert draws_a == [b.draw_words() for _ in range(20)]
    assert len(set(draws_a)) > 1     # one draw per batch, not a constant


def test_srpo_registry_build_tiny_and_gradient():
    reward = build_reward("srpo", config="tiny", random_init=True, seed=0, k=0.1)
    g = _grad_wrt_pixels(reward, _images(), PROMPTS)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ---- plug-in ----------------------------------------------------------------------------------------------------

def make_brightness(scale: float = 1.0):
    """A plug-in factory returning a plain function."""
    return lambda images, cond: scale * images.mean(dim=(1, 2, 3))


class _LabelReward(Reward):
    def __init__(self):
        super().__init__()
        self.spec = RewardSpec("labels", differentiable=False, reads_labels=True)

    def score(self, images, cond):
        return cond.float()


def make_label_reward():
    return _LabelReward()


NOT_CALLABLE = 3


def test_plugin_wraps_function_with_declared_spec():
    target = f"{__name__}:make_brightness"
    r = build_reward("plugin", target=target, differentiable=True, reads_prompts=True, input_range=[-1, 1],
                     kwargs={"scale": 2.0})
    assert r.spec == RewardSpec("make_brightness", differentiable=True, input_range=(-1.0, 1.0), reads_prompts=True)
    x = torch.full((3, 3, 4, 4), 0.25, requires_grad=True)
    out = r(x, ["p"] * 3)
    torch.testing.assert_close(out, torch.full((3,), 0.5))
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    black_box = build_reward("plugin", target=target, differentiable=False, label="bright")
    assert black_box.spec.name == "bright" and not black_box(x).requires_grad


def test_plugin_returning_a_reward_keeps_its_spec():
    r = build_reward("plugin", target=f"{__name__}:make_label_reward", reads_labels=True)
    assert r.spec.name == "labels" and r(torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="declares differentiable=True"):
        build_reward("plugin", target=f"{__name__}:make_label_reward", differentiable=True)


@pytest.mark.parametrize("target, message", [
    ("no_colon_here", "must look like 'package.module:callable'"),
    ("a:b:c", "must look like"),
    ("dmdr_no_such_module_xyz:f", "cannot import module 'dmdr_no_such_module_xyz'"),
    (f"{__name__}:missing_fn", "has no attribute 'missing_fn'"),
    (f"{__name__}:NOT_CALLABLE", "is a int, not a callable"),
])
def test_plugin_bad_targets_are_one_line_errors(target, message):
    with pytest.raises(ValueError, match=message) as e:
        build_reward("plugin", target=target, differentiable=False)
    assert repr(target) in str(e.value) and "\n" not in str(e.value)


def test_plugin_function_must_declare_differentiable_and_return_b_scores():
    with pytest.raises(ValueError, match="declare differentiable"):
        build_reward("plugin", target=f"{__name__}:make_brightness")
    r = build_reward("plugin", target=f"{__name__}:make_brightness", differentiable=False)
    r.fn = lambda images, cond: images.mean(dim=(2, 3))   # (B, C): wrong shape
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\)"):
        r(torch.zeros(2, 3, 4, 4))
