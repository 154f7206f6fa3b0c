"""Real-size text-to-image DMDR on one GPU: step time and peak memory of one iteration, per memory layout, with
gradient checkpointing off and on; few-step sampling latency against the 28-step CFG teacher.

Models (random weights, bf16, shipped real configs ``dmdr/models/configs``): the SD3-Medium (2.0B) and
SD3.5-Large (8.1B) transformers and the SDXL UNet (2.6B), with the real VAEs. The text encoders are replaced by
a random-embedding stand-in of the real output shapes (``(B, 77 + T5 tokens, 4096)`` / ``(B, 77, 2048)``): they
run under ``no_grad`` once per prompt (cached) and do not change a step's cost; their weights (5.6B params for
SD3 with T5-XXL) are *not* on the GPU here, which the ``dmdr train --dry-run`` estimate counts.

One DMDR iteration is :meth:`dmdr.train.dmdr.DMDRTrainer.iteration` itself (``optim.ratio=1``: backward
simulation, critic update, generator update with DMD + a reward on the differentiable VAE decode), on the bundle
that ``dmdr train`` builds: the recipe runs in smoke mode with the family's stand-in components
(:meth:`~dmdr.families.diffusers_t2i.DiffusersT2IFamily.standin`) swapped for real-size random components. The reward is the tiny random-init CLIP of smoke mode (the ViT-H-14 reward weights are not
carried). Layouts:

* ``shared``: dmdr's :class:`~dmdr.models.shared_base.SharedBaseT2I`, one frozen base + generator LoRA + critic LoRA;
* ``two_copy``: the official SD3 layout, generator = base + LoRA, critic = ``deepcopy(base)`` + LoRA;
* ``full_gen`` (SDXL only): the official SDXL layout, base + critic LoRA and a second float32 UNet trained in full.

Sampling: the 4-step student (generator view, no CFG) against the 28-step teacher with CFG (``sample_euler``,
2 NFE per step) at 1024 px, batch 1. Everything goes to a JSON file. ``--tiny`` runs the same code on the CPU
with the width/depth-shrunk stand-ins (64 px) for CI.

    bash bench/device_t2i.sh            # on a GPU (installs .whl/ wheels if present), ~8 min
    bash bench/device_t2i.sh --tiny     # CPU, < 3 min
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sd3-medium": "sd3-medium-4step", "sd35-large": "sd35-large-4step", "sdxl-base": "sdxl-1step"}
CASE_TIMEOUT = {"sd3-medium": 100, "sd35-large": 200, "sdxl-base": 160}  # seconds per model process on a GPU
LAYOUTS = {"sd3-medium": ("shared", "two_copy"), "sd35-large": ("shared", "two_copy"),
           "sdxl-base": ("shared", "two_copy", "full_gen")}


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak(dev):
    import torch

    return int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None


def _reset(dev):
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class RandomTextEncoder:
    """Factory of a ``TextEncoderStack`` returning fixed random embeddings of the real shapes (see the docstring)."""

    @staticmethod
    def make(family: str, seq: int, dim: int, pooled: int):
        import torch
        from tensordict import TensorDict

        from dmdr.models.t2i import POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, TextEncoderStack

        class _Enc(TextEncoderStack):
            def __init__(self):
                super().__init__()
                self.register_buffer("anchor", torch.zeros(1))

            def forward(self, prompts):
                B = len(prompts)
                g = torch.Generator().manual_seed(abs(hash(tuple(prompts))) % (2**31))
                pe = torch.randn(B, seq, dim, generator=g).to(self.anchor.device, self.anchor.dtype)
                po = torch.randn(B, pooled, generator=g).to(self.anchor.device, self.anchor.dtype)
                return TensorDict({PROMPT_EMBEDS: pe, POOLED_PROMPT_EMBEDS: po}, batch_size=[B], device=pe.device)

            def size_cond(self, td, height, width):
                if family != "sdxl":
                    return td
                from dmdr.models.sdxl import SDXLTextEncoder

                return SDXLTextEncoder.size_cond(self, td, height, width)

        return _Enc()


def real_components(name: str, dev, seed: int, max_sequence_length: int):
    """Real-size random-weight components (bf16 network and VAE built on ``dev``; random-embedding text stand-in)."""
    import torch

    from dmdr.models.sd3 import SD3Denoiser
    from dmdr.models.sdxl import SDXLDenoiser
    from dmdr.models.standins import build_reward_vae, build_vae, real_config, real_network
    from dmdr.models.t2i import T2IComponents

    cfg = real_config(name)
    torch.manual_seed(seed)
    net = real_network(name, device=dev, dtype=torch.bfloat16).eval()
    with torch.device(dev):
        vae = build_vae(cfg).to(torch.bfloat16).eval().requires_grad_(False)
        info = {"reward_vae": build_reward_vae(cfg).to(torch.bfloat16).eval()} if "reward_vae" in cfg else {}
    n = cfg["network"]
    if cfg["family"] == "sd3":
        enc = RandomTextEncoder.make("sd3", 77 + max_sequence_length, n["joint_attention_dim"], n["pooled_projection_dim"])
        den = SD3Denoiser(net)
    else:
        pooled = n["projection_class_embeddings_input_dim"] - 6 * n["addition_time_embed_dim"]
        enc = RandomTextEncoder.make("sdxl", 77, n["cross_attention_dim"], pooled)
        den = SDXLDenoiser(net)
    enc.to(dev)
    return T2IComponents(cfg["family"], den, vae, enc, info=info)


def _recipe(name: str, layout: str, ckpt: bool, args):
    from dmdr.recipes import load_recipe

    over = ["model.smoke=true", "optim.ratio=1", f"stages.0.batch_size={args.batch}",
            f"stages.1.batch_size={args.batch}", "logging.progress=false", "logging.sample_every=0",
            "logging.checkpoint_every=0", f"model.gradient_checkpointing={str(ckpt).lower()}",
            f"model.vae_gradient_checkpointing={str(ckpt).lower()}", "runtime.precision=bf16"]
    if not args.tiny:
        over.append("model.dtype=bf16")
    if name == "sdxl-base":
        over += ["model.reward_vae=null"] if layout != "full_gen" else []
        if layout != "full_gen":
            over += ["generator.init=null", "generator.lora={rank: 64, alpha: 128, targets: [to_q, to_k, to_v, "
                     "to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2, conv_shortcut, "
                     "downsamplers.0.conv, upsamplers.0.conv, time_emb_proj]}"]
        else:
            over += ["generator.init=null"]
    return load_recipe(ROOT / "recipes" / f"{RECIPES[name]}.yaml", over)


@contextlib.contextmanager
def _real_size(name, dev, args):
    """Swap the family's stand-ins for real-size random components (not in ``--tiny``) and set the resolution."""
    import torch

    import dmdr.families.diffusers_t2i as dt
    from dmdr.families.registry import family
    from dmdr.models.standins import real_config

    fam = family(real_config(name)["family"])
    saved = dt.SMOKE_RESOLUTION
    dt.SMOKE_RESOLUTION = args.res
    if not args.tiny:  # an instance attribute shadows the method of the (cached) family object
        fam.standin = lambda recipe: dt.Components(
            real_components(name, dev, recipe.seed, recipe.model.max_sequence_length), torch.bfloat16, None)
    try:
        yield
    finally:
        dt.SMOKE_RESOLUTION = saved
        fam.__dict__.pop("standin", None)


def _two_copy(bundle):
    """The official layout from a shared bundle: the critic (and real score) on a deep copy of the base."""
    from dmdr.models.lora import lora_parameters, set_trainable

    shared = bundle.shared
    critic_base = copy.deepcopy(shared.denoiser)
    for p in lora_parameters(shared.denoiser.net, "critic"):  # the original's critic adapter is never used
        p.requires_grad_(False)
    critic_params = lora_parameters(critic_base.net, "critic")
    set_trainable(critic_base, critic_params)
    return dataclasses.replace(bundle, base=critic_base, critic_params=critic_params)


def set_checkpointing(bundle, on: bool) -> None:
    """Gradient checkpointing of every network and VAE of a bundle, on or off (as ``model.gradient_checkpointing``
    and ``model.vae_gradient_checkpointing`` would set them at build time)."""
    from dmdr.models.t2i import adapter_aware_checkpoint

    shared = bundle.shared
    nets = {id(m): m for m in (bundle.base.net, shared.denoiser.net,
                               shared.generator_denoiser.net if shared.full_generator else None) if m is not None}
    for net in nets.values():
        net.enable_gradient_checkpointing(adapter_aware_checkpoint) if on else net.disable_gradient_checkpointing()
    for vae in (shared.vae, shared.reward_vae):
        if vae is not None:
            vae.enable_gradient_checkpointing() if on else vae.disable_gradient_checkpointing()


def measure_layout(name, layout, ckpts, dev, args) -> list[dict]:
    """One bundle of ``layout``; one record per checkpointing setting in ``ckpts`` (same seed for each)."""
    import torch

    from dmdr.families.registry import build_bundle
    from dmdr.train.dmdr import DMDRTrainer
    from dmdr.train.runtime import seed_everything

    _reset(dev)
    r = _recipe(name, layout, False, args)
    t0 = time.perf_counter()
    recs = []
    with _real_size(name, dev, args):
        bundle = build_bundle(r, dev)
        if layout == "two_copy":
            bundle = _two_copy(bundle)
        tr = DMDRTrainer(r, None, dev, console=lambda *a, **k: None, bundle=bundle)
        tr.state.stage = 1  # the reward stage: DMD + reward decode
        seed_everything(r.seed)
        for st in r.stages:  # build the (random-init) rewards seeded, then reseed: both layouts draw the same noise
            for term in st.rewards:
                tr.reward(term.name, term.kwargs)
        build_s = time.perf_counter() - t0
        n_params = {"base": sum(p.numel() for n, p in bundle.base.net.named_parameters() if ".lora_" not in n),
                    "generator_trainable": sum(p.numel() for p in bundle.generator_params),
                    "critic_trainable": sum(p.numel() for p in bundle.critic_params)}
        for ckpt in ckpts:
            set_checkpointing(bundle, ckpt)
            seed_everything(r.seed)
            times, losses = [], {}
            try:
                for i in range(args.warmup + args.iters):
                    if i == args.warmup:
                        _sync(dev)
                        if dev.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                    _sync(dev)
                    t = time.perf_counter()
                    out = tr.iteration()
                    _sync(dev)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t)
                    losses = {k: float(v) for k, v in out.items() if k.startswith("loss_")}
            except torch.OutOfMemoryError as e:  # a result, not a crash
                recs.append({"model": name, "layout": layout, "grad_checkpointing": ckpt, "oom": str(e)[:200]})
                for opt in (tr.opt_gen, tr.opt_critic):
                    opt.zero_grad(set_to_none=True)
                _reset(dev)
                continue
            peak = _peak(dev)
            recs.append({"model": name, "layout": layout, "grad_checkpointing": ckpt, "resolution": args.res,
                         "batch": args.batch, "steps": r.generator.steps, "iteration_s": sorted(times)[len(times) // 2],
                         "iteration_s_all": times, "peak_mem_bytes": peak,
                         "peak_mem_gib": None if peak is None else peak / 2**30, "build_s": build_s,
                         "params": n_params, "losses": losses})
    del tr, bundle
    _reset(dev)
    return recs


def measure_iteration(name, layout, ckpt, dev, args) -> dict:
    """:func:`measure_layout` for one checkpointing setting."""
    return measure_layout(name, layout, (ckpt,), dev, args)[0]


def measure_sampling(name, dev, args) -> dict:
    import torch

    from dmdr.families.registry import build_bundle
    from dmdr.models.t2i import sample_t2i, t2i_grid
    from dmdr.samplers import sample_euler

    _reset(dev)
    r = _recipe(name, "shared", False, args)
    with _real_size(name, dev, args):
        b = build_bundle(r, dev)
    shared = b.shared
    res = args.sample_res
    cond = shared.encode(["a photo of a cat"], height=res, width=res)
    uncond = shared.null_cond(cond)
    C, h, w = shared.latent_shape(res, res)
    noise = torch.randn(1, C, h, w, device=dev)
    teacher = shared.teacher()
    grid = t2i_grid(teacher.path, args.teacher_steps, r.generator.shift).to(dev)  # what `dmdr eval` uses

    def student():
        return sample_t2i(shared, None, cond, steps=args.student_steps, shift=r.generator.shift, height=res,
                          width=res, return_latents=True)

    def teacher_cfg():
        with torch.no_grad():
            return sample_euler(teacher, noise, grid, cond, uncond=uncond, cfg=r.dmd.cfg)

    out = {"model": name, "resolution": res, "student_steps": args.student_steps,
           "teacher_steps": args.teacher_steps, "teacher_nfe": 2 * args.teacher_steps, "student_nfe": args.student_steps}
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.tiny):
        for key, fn in (("student_s", student), ("teacher_s", teacher_cfg)):
            fn()  # warm-up
            ts = []
            for _ in range(args.sample_reps):
                _sync(dev)
                t = time.perf_counter()
                fn()
                _sync(dev)
                ts.append(time.perf_counter() - t)
            out[key] = sorted(ts)[len(ts) // 2]
    out["speedup"] = out["teacher_s"] / out["student_s"]
    out["nfe_ratio"] = out["teacher_nfe"] / out["student_nfe"]
    out["speedup_over_nfe_ratio"] = out["speedup"] / out["nfe_ratio"]
    del b, shared
    _reset(dev)
    return out


def run_case(args) -> None:
    """One model in this process: every layout × checkpointing, then sampling; one JSON line per result."""
    import torch

    dev = torch.device(args.device)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    with open(args.out, "a") as f:
        for layout in LAYOUTS[args.model]:
            for rec in measure_layout(args.model, layout, (True, False), dev, args):  # checkpointing on first
                f.write(json.dumps({"kind": "iteration", **rec}) + "\n")
                f.flush()
                print(json.dumps({k: v for k, v in rec.items() if k != "iteration_s_all"}), flush=True)
        rec = measure_sampling(args.model, dev, args)
        f.write(json.dumps({"kind": "sampling", **rec}) + "\n")
        print(json.dumps(rec), flush=True)


def summarise(lines: list[dict], meta: dict) -> dict:
    """Targets of the issue: shared ≤ 0.7 × two-copy peak memory at SD3.5-Large size; 4-step sampling ≥ 0.8 × the
    NFE ratio faster than the 28-step CFG teacher."""
    it = [x for x in lines if x.get("kind") == "iteration" and x.get("peak_mem_bytes")]
    ratios = {}
    for m in {x["model"] for x in it}:
        for ck in (False, True):
            sh = [x for x in it if x["model"] == m and x["layout"] == "shared" and x["grad_checkpointing"] == ck]
            tc = [x for x in it if x["model"] == m and x["layout"] == "two_copy" and x["grad_checkpointing"] == ck]
            if sh and tc:
                ratios[f"{m}/ckpt={ck}"] = sh[0]["peak_mem_bytes"] / tc[0]["peak_mem_bytes"]
    samp = {x["model"]: x["speedup_over_nfe_ratio"] for x in lines if x.get("kind") == "sampling"}
    return {**meta, "results": lines, "shared_over_two_copy_peak": ratios,
            "sampling_speedup_over_nfe_ratio": samp,
            "targets": {"shared_le_0.7_two_copy_sd35_large": {k: v <= 0.7 for k, v in ratios.items()
                                                               if k.startswith("sd35-large")},
                        "sampling_ge_0.8_nfe_ratio": {k: v >= 0.8 for k, v in samp.items()}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, width/depth-shrunk stand-ins, 64 px (CI)")
    ap.add_argument("--models", nargs="+", default=list(RECIPES))
    ap.add_argument("--model", help=argparse.SUPPRESS)  # worker mode: one model in this process
    ap.add_argument("--device", default=None)
    ap.add_argument("--res", type=int, default=None, help="training resolution (default 1024; --tiny 64)")
    ap.add_argument("--sample-res", type=int, default=None, help="sampling resolution (default 1024; --tiny 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--student-steps", type=int, default=4)
    ap.add_argument("--teacher-steps", type=int, default=28)
    ap.add_argument("--sample-reps", type=int, default=2)
    ap.add_argument("--case-timeout", type=int, default=None, help="seconds per model process (default: "
                    "sd3-medium 100, sd35-large 200, sdxl-base 160 on a GPU; 80 each with --tiny)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.res = args.res or (64 if args.tiny else 1024)
    args.sample_res = args.sample_res or args.res
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.model:
        run_case(args)
        return
    out = Path(args.out or ROOT / "bench" / "results" / ("device_t2i_tiny.json" if args.tiny else "device_t2i.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    lines_file = out.with_suffix(".jsonl")
    lines_file.unlink(missing_ok=True)
    failures = {}
    for m in args.models:
        cmd = [sys.executable, __file__, "--model", m, "--out", str(lines_file), "--device", args.device,
               "--res", str(args.res), "--sample-res", str(args.sample_res), "--batch", str(args.batch),
               "--warmup", str(args.warmup), "--iters", str(args.iters), "--student-steps", str(args.student_steps),
               "--teacher-steps", str(args.teacher_steps), "--sample-reps", str(args.sample_reps)] + \
            (["--tiny"] if args.tiny else [])
        try:
            limit = args.case_timeout or (80 if args.tiny else CASE_TIMEOUT[m])
            rc = subprocess.run(cmd, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            failures[m] = rc
    lines = [json.loads(l) for l in lines_file.read_text().splitlines()] if lines_file.exists() else []
    import torch

    meta = {"command": "bash bench/device_t2i.sh" + (" --tiny" if args.tiny else ""), "tiny": args.tiny,
            "device": args.device, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "host": platform.node(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "failures": failures,
            "note": "one iteration = DMDRTrainer.iteration (ratio 1, reward stage); medians of --iters runs"}
    out.write_text(json.dumps(summarise(lines, meta), indent=1) + "\n")
    print(f"wrote {out} ({len(lines)} results, failures: {failures or 'none'})")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
