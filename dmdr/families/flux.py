"""FLUX.1-dev (``model.family: flux1``) and FLUX.2-klein (``model.family: flux2``) on the diffusers text-to-image
family base.

Quirks (docs/families/flux.md; adapters in :mod:`dmdr.models.flux`): unpacked latents (16 / 32 channels, the
denoiser packs 2×2 patches into tokens and builds the position ids); rectified flow with ``x̂0 = x_t − t·v``
(``model.t_min`` must be 0); the resolution-dependent time shift is the recipe's ``generator.shift``
(:func:`~dmdr.models.flux.flux1_shift` / :func:`~dmdr.models.flux.flux2_shift`); FLUX.1-dev is guidance-distilled:
student, fake and real score all take the guidance-embedding input ``model.guidance`` (default 3.5) and the real
score is one pass (``dmd.cfg`` must be ≤ 1, instead of method.md §2.5's two-pass CFG); FLUX.2-klein has no guidance
embedding and uses true CFG on the real score (``dmd.cfg``, the pipeline's 4.0), and its teacher must be the
undistilled klein-base. Text prompts: T5 at ``model.max_sequence_length`` (512 in the recipe, FluxPipeline's
default) / Qwen3 at ``model.max_sequence_length`` (512, Flux2KleinPipeline's).

``memory`` traces the real FLUX network (packed tokens, ``model.max_sequence_length`` text tokens) and VAE on the
meta device with the helpers of :mod:`dmdr.train.memory_estimate` (same rules: a lower bound of the peak).
"""
from __future__ import annotations

from dmdr.families.diffusers_t2i import DTYPES, Components, DiffusersT2IFamily

FLUX_DEFAULT_GUIDANCE = 3.5


class _FluxFamily(DiffusersT2IFamily):
    """What FLUX.1 and FLUX.2 share: ``t_min = 0``, image sides multiple of 16, the text length cap in smoke runs,
    the FLUX memory estimate."""

    def check_model(self, recipe) -> None:
        m = recipe.model
        self.config_name(recipe)  # model.config of another family: one line now, not at build
        if m.t_min != 0.0:
            raise ValueError(f"model.t_min={m.t_min}: FLUX uses x̂0 = x_t - t·v (method.md §1 with t_min = 0); set "
                             f"model.t_min: 0")
        if m.resolution % 16:
            raise ValueError(f"model.resolution={m.resolution}: FLUX needs a multiple of 16 (VAE factor 8 x 2x2 "
                             f"packing)")

    def standin(self, recipe) -> Components:
        loaded = super().standin(recipe)
        enc = loaded.components.encoder
        enc.max_sequence_length = min(recipe.model.max_sequence_length, enc.max_sequence_length)
        return loaded

    def memory(self, recipe):
        from dmdr.families.flux_memory import estimate_flux_memory

        return estimate_flux_memory(recipe, self.config_name(recipe))


class Flux1Family(_FluxFamily):
    name = "flux1"
    config_names = ("flux1-dev",)

    def check_model(self, recipe) -> None:
        super().check_model(recipe)
        cfg = getattr(getattr(recipe, "dmd", None), "cfg", 1.0)
        if cfg > 1.0:
            raise ValueError(f"dmd.cfg={cfg}: FLUX.1-dev is guidance-distilled (no CFG); its real score is one pass "
                             f"at the guidance embedding model.guidance (default {FLUX_DEFAULT_GUIDANCE}); "
                             f"set dmd.cfg: 1")

    def sample_teacher(self, bundle, inputs, *, steps: int, cfg: float = 1.0):
        """The frozen teacher at its guidance embedding ``model.guidance`` (one pass per step); ``cfg > 1`` is
        refused (FLUX.1-dev has no CFG). FLUX.1's shift depends on the resolution only: the recipe's holds."""
        if cfg > 1.0:
            raise ValueError(f"teacher cfg={cfg}: FLUX.1-dev is guidance-distilled (no CFG); the teacher runs at "
                             f"model.guidance={bundle.base.guidance}; use cfg 1 and --set model.guidance=G")
        return super().sample_teacher(bundle, inputs, steps=steps, cfg=cfg)

    def denoiser_kwargs(self, recipe) -> dict:
        g = recipe.model.guidance
        return {"t_min": recipe.model.t_min, "guidance": FLUX_DEFAULT_GUIDANCE if g is None else g}

    def load_local(self, recipe) -> Components:
        from dmdr.models.flux import load_flux1

        m = recipe.model
        comps = load_flux1(m.path, dtype=DTYPES[m.dtype], max_sequence_length=m.max_sequence_length,
                           **self.denoiser_kwargs(recipe))
        return Components(comps, DTYPES[m.dtype], None)


class Flux2Family(_FluxFamily):
    name = "flux2"
    config_names = ("flux2-klein-4b", "flux2-klein-9b")

    def check_model(self, recipe) -> None:
        super().check_model(recipe)
        if recipe.model.guidance is not None:
            raise ValueError(f"model.guidance={recipe.model.guidance}: FLUX.2-klein has no guidance embedding; its "
                             f"real score uses CFG (dmd.cfg, 4.0 in Flux2KleinPipeline); remove model.guidance")

    def denoiser_kwargs(self, recipe) -> dict:
        return {"t_min": recipe.model.t_min}

    def sample_teacher(self, bundle, inputs, *, steps: int, cfg: float = 1.0):
        """The frozen teacher with CFG ``cfg`` on FLUX.2's own schedule for ``steps`` steps: its empirical shift
        depends on the step count (``compute_empirical_mu``; S = 7.56 for 50 steps at 1024², 9.89 for 4), so the
        recipe's 4-step ``generator.shift`` is replaced by :func:`~dmdr.models.flux.flux2_shift` (res, res,
        steps); the grid then equals ``Flux2KleinPipeline``'s sigmas."""
        import copy

        from dmdr.models.flux import flux2_shift

        view = copy.copy(bundle)
        view.recipe = bundle.recipe.model_copy(deep=True)
        view.recipe.generator.shift = flux2_shift(bundle.resolution, bundle.resolution, steps)
        return super().sample_teacher(view, inputs, steps=steps, cfg=cfg)

    def load_local(self, recipe) -> Components:
        from dmdr.models.flux import load_flux2_klein

        m = recipe.model
        comps = load_flux2_klein(m.path, dtype=DTYPES[m.dtype], max_sequence_length=m.max_sequence_length,
                                 **self.denoiser_kwargs(recipe))
        return Components(comps, DTYPES[m.dtype], None)


__all__ = ["Flux1Family", "Flux2Family", "FLUX_DEFAULT_GUIDANCE"]
