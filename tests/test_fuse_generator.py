"""``dmdr sample`` fuses the generator LoRA into the base (dmdr.models.lora.fuse_adapter): the same student as a
plain network (docs/scale.md: the unmerged view cost 1.9-2.4x a merged forward on an H200)."""
import pytest
import torch

pytest.importorskip("diffusers")

from peft.tuners.lora import LoraLayer  # noqa: E402

from dmdr.models.lora import lora_parameters  # noqa: E402
from dmdr.models.sd3 import build_tiny_sd3  # noqa: E402
from dmdr.models.sdxl import build_tiny_sdxl  # noqa: E402
from dmdr.models.t2i import SharedBaseT2I, sample_t2i  # noqa: E402
from t2i_helpers import randomize  # noqa: E402


@pytest.mark.parametrize("build", [build_tiny_sd3, build_tiny_sdxl], ids=["sd3", "sdxl"])
def test_fused_student_equals_the_lora_view_and_has_no_lora_layers(build):
    shared = SharedBaseT2I.from_components(build(0)).eval()
    randomize(lora_parameters(shared.denoiser.net, "generator"), seed=1)
    randomize(lora_parameters(shared.denoiser.net, "critic"), seed=2)  # must not leak into the fused student
    kw = dict(steps=4, shift=3.0, height=64, width=64, return_latents=True)
    with torch.no_grad():
        before = sample_t2i(shared, None, ["a cat", "a dog"], **kw)
        teacher_before = sample_t2i(shared.teacher(), shared.vae, ["a cat", "a dog"], encoder=shared.encoder, **kw)
    assert not torch.allclose(before, teacher_before, atol=1e-3)  # the generator LoRA changes the student
    n = shared.fuse_generator()
    assert n > 0 and not any(isinstance(m, LoraLayer) for m in shared.denoiser.net.modules())
    assert shared.generator() is shared.denoiser
    with torch.no_grad():
        after = sample_t2i(shared, None, ["a cat", "a dog"], **kw)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert shared.fuse_generator() == 0  # idempotent
    for view in (shared.teacher, shared.fake_score, shared.real_score):
        with pytest.raises(RuntimeError, match="fused"):
            view()
