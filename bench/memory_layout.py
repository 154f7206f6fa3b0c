"""Peak memory of one DMDR training iteration under four memory layouts (figures quoted in docs/models.md).

A mid-size random SD3-like transformer (``SD3Transformer2DModel``, ~100M parameters, 16 latent channels, 32×32
latents = 256 px) is trained for ``--iters`` iterations; each iteration is one critic step and one generator step
(method.md §2.12, steps 2–12: a no-grad generator rollout, the critic's denoising loss, the generator's DMD loss
with a CFG'd real score). Layouts:

* ``shared``   dmdr: ONE frozen base + generator LoRA (r64/α128) + critic LoRA (r32/α32), :class:`SharedBaseT2I`.
* ``official`` the official DMDR code: generator = base + LoRA, critic = ``deepcopy(base)`` + LoRA (2 bases).
* ``naive``    DMD2-style: a fully trained generator copy + a critic copy (base + LoRA) + a separate teacher
               (3 bases, AdamW states for every generator weight).
* ``lora_ft``  reference: a plain LoRA fine-tune step (flow-matching loss) of the same base.

Every layout runs in a fresh subprocess. On CPU the figure is the peak RSS (``getrusage``) minus the RSS after
imports; on CUDA it is ``torch.cuda.max_memory_allocated``. Results go to ``bench/results/memory_layout.json``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/memory_layout.py            # ~2-4 min on one CPU core
    python bench/memory_layout.py --device cuda --dtype bfloat16 --layers 24    # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = ("shared", "official", "naive", "lora_ft")
DESCRIPTIONS = {
    "shared": "dmdr: 1 frozen base + generator LoRA + critic LoRA",
    "official": "official DMDR: base+gen LoRA, deepcopy(base)+critic LoRA",
    "naive": "DMD2-style: full generator copy + critic copy (+LoRA) + teacher",
    "lora_ft": "plain LoRA fine-tune step of the same base",
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _config(args) -> dict:
    d = args.heads * args.head_dim
    return dict(sample_size=args.size, patch_size=2, in_channels=16, out_channels=16, num_layers=args.layers,
                attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=d,
                caption_projection_dim=d, pooled_projection_dim=256, pos_embed_max_size=args.size)


def worker(args) -> dict:
    import torch
    from tensordict import TensorDict

    from dmdr.models.lora import AdapterView, add_lora, lora_parameters, set_trainable
    from dmdr.models.sd3 import SD3_LORA_TARGETS, SD3Denoiser
    from dmdr.models.t2i import (POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, LoraSpec, SharedBaseT2I, TextEncoderStack,
                                 tiny_vae)
    from dmdr.scores import distribution_matching_targets

    import peft.tuners.lora  # noqa: F401  (imported before the baseline is taken)
    from diffusers import SD3Transformer2DModel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    base_rss = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = _config(args)
    d, B, L = cfg["joint_attention_dim"], args.batch, args.text_len

    class RandomText(TextEncoderStack):  # the text encoders are out of scope: fixed random embeddings
        def forward(self, prompts):
            g = torch.Generator().manual_seed(len(prompts))
            return TensorDict({PROMPT_EMBEDS: torch.randn(len(prompts), L, d, generator=g),
                               POOLED_PROMPT_EMBEDS: torch.randn(len(prompts), 256, generator=g)},
                              batch_size=[len(prompts)])

    torch.manual_seed(0)

    def make_base():
        return SD3Denoiser(SD3Transformer2DModel(**cfg).to(device=device, dtype=dtype).eval())

    gen_spec = LoraSpec(64, 128, SD3_LORA_TARGETS)
    critic_spec = LoraSpec(32, 32, SD3_LORA_TARGETS)

    def lora(den, name, spec):
        add_lora(den.net, name, rank=spec.rank, alpha=spec.alpha, target_modules=list(spec.target_modules))
        for p in lora_parameters(den.net, name):
            p.data = p.data.float()
        return lora_parameters(den.net, name)

    layout = args.worker
    base = make_base()
    bases = [base]  # every distinct network copy of this layout
    n_base = sum(p.numel() for p in base.parameters())
    if layout == "shared":
        shared = SharedBaseT2I(base, tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609), RandomText(),
                               generator_lora=gen_spec, critic_lora=critic_spec, cache_size=0).to(device)
        if args.checkpointing:
            shared.enable_gradient_checkpointing()
        gen_params, critic_params = shared.generator_parameters(), shared.critic_parameters()
        generator, real, fake = shared.generator(), shared.real_score(0.5), shared.fake_score(2.0)
        null = shared.null_cond
    elif layout == "official":
        critic_base = copy.deepcopy(base)
        bases += [critic_base]
        gen_params = lora(base, "generator", gen_spec)
        critic_params = lora(critic_base, "critic", critic_spec)
        set_trainable(base, gen_params)
        set_trainable(critic_base, critic_params)
        generator = AdapterView(base, "generator", 1.0)
        real, fake = AdapterView(critic_base, "critic", 0.5), AdapterView(critic_base, "critic", 2.0)
        null = None
    elif layout == "naive":
        teacher = base
        generator = copy.deepcopy(base).train()
        critic_base = copy.deepcopy(base)
        bases += [generator, critic_base]
        critic_params = lora(critic_base, "critic", critic_spec)
        set_trainable(teacher, [])
        set_trainable(critic_base, critic_params)
        gen_params = list(generator.parameters())
        for p in gen_params:
            p.requires_grad_(True)
        real, fake = teacher, AdapterView(critic_base, "critic", 2.0)
        null = None
    elif layout == "lora_ft":
        gen_params = lora(base, "generator", gen_spec)
        set_trainable(base, gen_params)
        generator, critic_params = AdapterView(base, "generator", 1.0), []
    else:
        raise ValueError(layout)
    if args.checkpointing and layout != "shared":
        from dmdr.models.t2i import adapter_aware_checkpoint

        for den in bases:
            den.net.enable_gradient_checkpointing(adapter_aware_checkpoint)
    opt_g = torch.optim.AdamW(gen_params, lr=1e-6, weight_decay=0.01)
    opt_c = torch.optim.AdamW(critic_params, lr=1e-6, weight_decay=0.0) if critic_params else None
    path = base.path
    h = args.size
    text = RandomText()(["x"] * B).to(device).apply(lambda t: t.to(dtype))
    uncond = TensorDict({k: torch.zeros_like(v) for k, v in text.items()}, batch_size=[B])
    built_rss = _rss_mb()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        noise = torch.randn(B, 16, h, h, device=device)
        s = torch.ones(B, device=device)
        if layout == "lora_ft":
            x0 = torch.randn(B, 16, h, h, device=device)
            tau = torch.rand(B, device=device)
            v = generator(path.renoise(x0, tau, noise), tau, text)
            loss = ((v.float() - path.target(x0, noise, tau)) ** 2).mean()
            loss.backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            continue
        # critic step: no-grad 1-step rollout, then the fake score's denoising loss (method.md §2.3)
        with torch.no_grad():
            x_clean = path.to_x0(noise, s, generator(noise, s, text))
        tau = torch.rand(B, device=device)
        eps = torch.randn_like(x_clean)
        pred = fake(path.renoise(x_clean, tau, eps), tau, text)
        ((pred.float() - path.target(x_clean, eps, tau)) ** 2).mean().backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        # generator step: DMD loss with a CFG'd real score (method.md §2.4, §2.5)
        x0 = path.to_x0(noise, s, generator(noise, s, text))
        td = distribution_matching_targets(x0, real, fake, text, tau=torch.rand(B, device=device),
                                           noise=torch.randn_like(x0), uncond=uncond if null is None else null(text),
                                           cfg_scale=4.0)
        g = (td["x0_fake"] - td["x0_real"]) / ((x0 - td["x0_real"]).abs().mean((1, 2, 3), keepdim=True) + 1e-8)
        (0.5 * ((x0.float() - (x0 - g).detach().float()) ** 2).mean()).backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / args.iters
    n_gen = sum(p.numel() for p in gen_params)
    n_critic = sum(p.numel() for p in critic_params)
    result = dict(layout=layout, description=DESCRIPTIONS[layout], base_params_m=n_base / 1e6,
                  generator_trainable_m=n_gen / 1e6, critic_trainable_m=n_critic / 1e6,
                  seconds_per_iter=seconds)
    if cuda:
        torch.cuda.synchronize()
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["metric"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_mb"] = _peak_rss_mb() - base_rss
        result["after_build_mb"] = built_rss - base_rss
        result["metric"] = "peak RSS - RSS after imports"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="base dtype (LoRA weights stay float32)")
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="latent side (pixels = 8x)")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2, help="iterations (>= 2 so optimiser states exist at the peak)")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_layout.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for layout in args.layouts.split(","):
        cmd = [sys.executable, __file__, "--worker", layout] + [a for a in sys.argv[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"layout {layout} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(line[len("RESULT "):])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {layout:9s} peak {row['peak_mb']:8.0f} MB  ({row['seconds_per_iter']:.1f} s/iter)", flush=True)
    ref = next((r["peak_mb"] for r in rows if r["layout"] == "shared"), None)
    for r in rows:
        r["ratio_to_shared"] = r["peak_mb"] / ref if ref else None
    print(f"\n{'layout':10s} {'peak MB':>9s} {'x shared':>9s} {'trainable M':>12s}  description")
    for r in rows:
        ratio = f"{r['ratio_to_shared']:.2f}" if r["ratio_to_shared"] else "-"
        print(f"{r['layout']:10s} {r['peak_mb']:9.0f} {ratio:>9s} "
              f"{r['generator_trainable_m'] + r['critic_trainable_m']:12.2f}  {r['description']}")
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True) if out.suffix == "" else out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(config=_config(args), batch=args.batch, text_len=args.text_len, iters=args.iters,
                  device=args.device, dtype=args.dtype, checkpointing=args.checkpointing,
                  torch=torch.__version__, python=platform.python_version(),
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"), results=rows,
                  command="python bench/memory_layout.py " + " ".join(sys.argv[1:]))
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
