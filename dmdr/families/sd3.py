"""SD3-Medium and SD3.5-Large (``model.family: sd3``): MMDiT, rectified flow, CLIP-L + CLIP-G + T5-XXL.

Quirks (docs/architecture.md, docs/models.md): flow matching with the official ``x̂0 = x_t + (t_min − t)·v``,
``t_min = 0.001`` (method.md §1; any other ``model.t_min`` is refused); T5 prompts truncated to
``model.max_sequence_length``; the grid is :func:`~dmdr.schedules.few_step_grid` with ``t_min``.
"""
from __future__ import annotations

from dmdr.families.diffusers_t2i import DTYPES, Components, DiffusersT2IFamily

SD3_T_MIN = 0.001


class SD3Family(DiffusersT2IFamily):
    name = "sd3"
    config_names = ("sd3-medium", "sd35-large")

    def check_model(self, recipe) -> None:
        m = recipe.model
        if abs(m.t_min - SD3_T_MIN) > 1e-12:
            raise ValueError(f"model.t_min={m.t_min}: SD3 uses x̂0 = x_t + (0.001 - t)·v (method.md §1); "
                             f"set model.t_min: 0.001")

    def denoiser_kwargs(self, recipe) -> dict:
        return {"t_min": recipe.model.t_min}

    def standin(self, recipe) -> Components:
        loaded = super().standin(recipe)
        enc = loaded.components.encoder
        enc.max_sequence_length = min(recipe.model.max_sequence_length, enc.max_sequence_length)
        return loaded

    def load_local(self, recipe) -> Components:
        from dmdr.models.sd3 import load_sd3

        m = recipe.model
        dtype = DTYPES[m.dtype]
        comps = load_sd3(m.path, dtype=dtype, max_sequence_length=m.max_sequence_length, t_min=m.t_min)
        return Components(comps, dtype, None)


__all__ = ["SD3Family", "SD3_T_MIN"]
