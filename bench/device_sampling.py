"""Where the few-step student's sampling time goes at 1024 px (follow-up of bench/device_t2i.py's sampling rows):
the 4-step student through the unmerged LoRA view (what ``dmdr sample`` and the trainers' sample grids run), the
same student with its LoRA merged into a plain bf16 network (what ``export_full_model`` ships), and the teacher's
28-step rollout without and with batched CFG. All return latents (no VAE decode); batch 1; bf16 autocast; medians
of --reps timed runs after one warm-up. Random weights at real size (bench/device_t2i.py ``real_components``).

    PYTHONPATH=/tmp/site:$PWD python3 bench/device_sampling.py --out OUT.json      # GPU, ~2 min
    OMP_NUM_THREADS=1 python bench/device_sampling.py --tiny --out /tmp/s.json     # CPU stand-ins, 64 px (a check)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_t2i as D  # noqa: E402


def timed(fn, dev, reps: int) -> dict:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        D._sync(dev)
        t = time.perf_counter()
        fn()
        D._sync(dev)
        ts.append(time.perf_counter() - t)
    return {"median_s": sorted(ts)[len(ts) // 2], "all_s": ts}


def measure(name: str, dev, args) -> dict:
    import torch

    from dmdr.models.sd3 import SD3Denoiser
    from dmdr.models.sdxl import SDXLDenoiser
    from dmdr.models.t2i import merged_state_dict, sample_t2i
    from dmdr.samplers import sample_euler
    from dmdr.schedules import few_step_grid
    from dmdr.families.registry import build_bundle

    D._reset(dev)
    r = D._recipe(name, "shared", False, args)
    with D._real_size(name, dev, args):
        b = build_bundle(r, dev)
    shared = b.shared
    res = args.res
    cond = shared.encode(["a photo of a cat"], height=res, width=res)
    uncond = shared.null_cond(cond)
    C, h, w = shared.latent_shape(res, res)
    noise = torch.randn(1, C, h, w, device=dev)
    teacher = shared.teacher()
    sd3 = name != "sdxl-base"
    tgrid = few_step_grid(args.teacher_steps, 3.0, shared.path.t_min).to(dev) if sd3 else \
        torch.linspace(0.999, 0.0, args.teacher_steps + 1, device=dev)
    net = shared.denoiser.net
    wdtype = next(net.parameters()).dtype
    with torch.device(dev):
        clone = type(net).from_config(net.config).to(wdtype)
    clone.load_state_dict(merged_state_dict(net, "generator", dtype=wdtype))
    clone.eval().requires_grad_(False)
    merged = SD3Denoiser(clone) if sd3 else SDXLDenoiser(clone)
    kw = dict(steps=args.student_steps, shift=r.generator.shift, height=res, width=res, return_latents=True)
    fns = {
        "student_lora_view": lambda: sample_t2i(shared, None, cond, **kw),
        "student_merged": lambda: sample_t2i(merged, shared.vae, cond, **kw),
        "teacher_no_cfg": lambda: sample_euler(teacher, noise, tgrid, cond),
        "teacher_cfg": lambda: sample_euler(teacher, noise, tgrid, cond, uncond=uncond, cfg=r.dmd.cfg),
    }
    out = {"model": name, "resolution": res, "student_steps": args.student_steps, "teacher_steps": args.teacher_steps,
           "weights_dtype": str(wdtype)}
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.tiny):
        a = sample_t2i(shared, None, cond, **kw)
        m = sample_t2i(merged, shared.vae, cond, **kw)
        out["merged_vs_view_max_abs_diff"] = float((a.float() - m.float()).abs().max())
        out["view_latent_abs_mean"] = float(a.float().abs().mean())
        for k, fn in fns.items():
            out[k] = timed(fn, dev, args.reps)
    st, te = args.student_steps, args.teacher_steps
    out["ms_per_forward"] = {"student_lora_view": 1e3 * out["student_lora_view"]["median_s"] / st,
                             "student_merged": 1e3 * out["student_merged"]["median_s"] / st,
                             "teacher_no_cfg": 1e3 * out["teacher_no_cfg"]["median_s"] / te,
                             "teacher_cfg_batched_pair": 1e3 * out["teacher_cfg"]["median_s"] / te}
    out["speedup_merged_vs_teacher_cfg"] = out["teacher_cfg"]["median_s"] / out["student_merged"]["median_s"]
    out["speedup_view_vs_teacher_cfg"] = out["teacher_cfg"]["median_s"] / out["student_lora_view"]["median_s"]
    del b, shared, clone, merged
    D._reset(dev)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--models", nargs="+", default=["sd3-medium", "sdxl-base", "sd35-large"])
    ap.add_argument("--res", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--student-steps", type=int, default=4)
    ap.add_argument("--teacher-steps", type=int, default=28)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.res = args.res or (64 if args.tiny else 1024)
    import platform

    import torch

    dev = torch.device("cpu" if args.tiny else "cuda")
    rows = []
    for m in args.models:
        row = measure(m, dev, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in fns_keys()}), flush=True)
        Path(args.out).write_text(json.dumps({
            "command": "python3 bench/device_sampling.py" + (" --tiny" if args.tiny else ""), "tiny": args.tiny,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "rows": rows}, indent=1) + "\n")


def fns_keys():
    return ("student_lora_view", "student_merged", "teacher_no_cfg", "teacher_cfg")


if __name__ == "__main__":
    main()
