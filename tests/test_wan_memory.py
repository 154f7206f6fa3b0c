"""The Wan --dry-run memory helpers trace the real network and VAE on the meta device with video shapes."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dmdr.train.memory_wan import umt5_params, wan_activation_bytes, wan_decode_activation_bytes  # noqa: E402

NAME = "wan2.1-t2v-1.3b"


@pytest.mark.slow
def test_transformer_trace_grows_with_frames_and_checkpointing_cuts_it():
    a5, n = wan_activation_bytes(NAME, 64, 64, 5, torch.bfloat16, checkpointing=False, text_tokens=512)
    a9, _ = wan_activation_bytes(NAME, 64, 64, 9, torch.bfloat16, checkpointing=False, text_tokens=512)
    c9, _ = wan_activation_bytes(NAME, 64, 64, 9, torch.bfloat16, checkpointing=True, text_tokens=512)
    assert n == 1_418_996_800
    assert a9 > a5 > 0 and c9 < a9 / 5  # 3 latent frames > 2; checkpointing keeps only block inputs


def test_vae_decode_trace_scales_with_decoded_frames():
    d1, n_vae = wan_decode_activation_bytes(NAME, 64, 64, 1, torch.float32)
    d5, _ = wan_decode_activation_bytes(NAME, 64, 64, 5, torch.float32)
    assert n_vae == 126_892_531 and d5 > 3 * d1 > 0
    assert umt5_params(NAME) == 5_680_910_336


@pytest.mark.slow
def test_dry_run_of_the_recipe_bounds_the_reward_decode():
    from pathlib import Path

    from dmdr.families import family
    from dmdr.recipes import load_recipe

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "wan2.1-t2v-1.3b-4step.yaml"
    one = family("wan").memory(load_recipe(recipe))
    every = family("wan").memory(load_recipe(recipe, ["model.reward_frames=null"]))
    assert one.detail["reward_decode_frames"] == 1 and every.detail["reward_decode_frames"] == 81
    assert one.weights == every.weights and every.activations > 20 * one.activations
    assert one.detail["network_params"] == 1_418_996_800 and one.detail["resolution"] == "480x832x81"
