"""Export of a text-to-image student to files the family's own diffusers tools load.

:func:`export_lora_diffusers` writes the generator LoRA as ``pytorch_lora_weights.safetensors`` through the
denoiser's pipeline class (``StableDiffusion3Pipeline.load_lora_weights`` / ``StableDiffusionXLPipeline...`` accept
it); :func:`export_full_model` writes the merged network as a diffusers model folder; :func:`export_generator` writes
whichever the run's generator is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dmdr.models.shared_base import SharedBaseT2I
from dmdr.models.t2i_components import GENERATOR

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _lora_metadata(net: nn.Module, adapter: str) -> dict | None:
    cfg = getattr(net, "peft_config", {}).get(adapter)
    if cfg is None:
        return None
    meta = cfg.to_dict()
    return json.loads(json.dumps(meta, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def export_lora_diffusers(shared: SharedBaseT2I, out_dir: str | Path, family: str | None = None, *,
                          adapter: str = GENERATOR, dtype: torch.dtype | None = None) -> Path:
    """Write one adapter (default: the generator) as a diffusers LoRA folder; returns the weights file.

    The file is ``out_dir/pytorch_lora_weights.safetensors`` with ``transformer.``/``unet.``-prefixed peft keys
    (``...to_q.lora_A.weight``) and the LoRA config (rank, alpha, targets) in the safetensors metadata, written by
    the denoiser's pipeline class (:meth:`~dmdr.models.t2i_components.DiffusersDenoiser.save_lora_weights`). Load
    with that pipeline's ``load_lora_weights(out_dir)`` (``StableDiffusion3Pipeline`` for SD3/SD3.5,
    ``StableDiffusionXLPipeline`` for SDXL). ``family``, when given, must be the base's (a consistency check).
    """
    from peft import get_peft_model_state_dict

    if family is not None and family != shared.family:
        raise ValueError(f"family={family!r} but the base is a {shared.family!r} denoiser")
    if adapter == GENERATOR and shared.full_generator:
        raise ValueError("the generator is a full-weights network, not a LoRA: use export_generator / "
                         "export_full_model")
    net = shared.denoiser.net
    state = get_peft_model_state_dict(net, adapter_name=adapter)
    if not state:
        raise ValueError(f"the base has no LoRA adapter named {adapter!r}")
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
    meta = _lora_metadata(net, adapter)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shared.denoiser.save_lora_weights(out, state, meta)
    return out / LORA_WEIGHT_NAME


def merged_state_dict(net: nn.Module, adapter: str = GENERATOR, *, dtype: torch.dtype | None = None
                      ) -> dict[str, Tensor]:
    """The base network's state dict with ``adapter`` merged (``W + scaling · B A``) and all peft keys removed."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Tensor] = {}
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            with torch.no_grad():
                deltas[f"{name}.weight"] = module.get_delta_weight(adapter).float()
    out: dict[str, Tensor] = {}
    for key, value in net.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        value = value.detach()
        if key in deltas:
            value = (value.float() + deltas.pop(key).to(value.device)).to(value.dtype)
        out[key] = value.to(dtype or value.dtype).contiguous().cpu()
    if deltas:
        raise RuntimeError(f"could not place merged LoRA weights for {sorted(deltas)[:3]}")
    return out


def export_full_model(shared: SharedBaseT2I, out_dir: str | Path, *, adapter: str = GENERATOR,
                      dtype: torch.dtype | None = None, max_shard_size: str = "10GB") -> Path:
    """Write the base with ``adapter`` merged as a diffusers model folder ``out_dir/<transformer|unet>``.

    Load it with ``SD3Transformer2DModel.from_pretrained(folder)`` (or ``UNet2DConditionModel``) and pass it to the
    pipeline in place of the original network. Returns the folder.
    """
    from huggingface_hub import save_torch_state_dict

    net = shared.denoiser.net
    folder = Path(out_dir) / shared.denoiser.network_subfolder
    folder.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(net, adapter, dtype=dtype)
    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=max_shard_size)
    net.save_config(folder)
    return folder


def export_generator(shared: SharedBaseT2I, run_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the student: the generator LoRA as ``run_dir/student_lora/pytorch_lora_weights.safetensors``
    (:func:`export_lora_diffusers`) or, for a full-weights generator, the network as a diffusers model folder
    ``run_dir/student_<unet|transformer>`` (load with ``UNet2DConditionModel.from_pretrained``). Returns the path."""
    if not shared.full_generator:
        return export_lora_diffusers(shared, Path(run_dir) / "student_lora", dtype=dtype)
    import copy

    net = shared.generator_denoiser.net
    if dtype is not None:  # a converted copy: the live float32 weights stay untouched
        net = copy.deepcopy(net).to(dtype)
    folder = Path(run_dir) / f"student_{shared.generator_denoiser.network_subfolder}"
    net.save_pretrained(folder, safe_serialization=True)
    return folder



__all__ = ["LORA_WEIGHT_NAME", "export_lora_diffusers", "merged_state_dict", "export_full_model", "export_generator"]
