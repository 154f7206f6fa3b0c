"""Issue 10: the GRPO trainer's regularisers dmd_adv / dmd_ca_adv, its network-evaluation counter, the critic
amortisation knobs, per-term gradient norms and the clip flag."""
import json
import os
from pathlib import Path

import pytest
import torch

from dmdr.errors import UserError
from dmdr.recipes import load_recipe, recipes_dir

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RECIPE = recipes_dir() / "digits-grpo.yaml"


@pytest.fixture(scope="module")
def teacher(shared_tiny_teacher):
    return shared_tiny_teacher


def _run(teacher, out: Path, *over):
    from dmdr.train.grpo import GRPOTrainer

    r = load_recipe(RECIPE, [f"model.teacher={teacher}", "runtime.device=cpu", "rl.batch_size=8", "rl.group_size=4",
                             "rl.minibatch_size=4", "optim.ratio=1", "iterations=2", "eval.samples=0",
                             "logging.progress=false", "logging.log_every=1", "logging.sample_every=0",
                             "logging.checkpoint_every=0", "critic.lora.rank=4", "critic.lora.alpha=4", "monitors.every=0",
                             *over])
    GRPOTrainer(r, out, torch.device("cpu"), console=lambda *a: None).run()
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


# Known configuration: B = 8 trajectories, N = 1 step, minibatches of 4 transitions, 2 PPO epochs -> 4 generator
# steps per iteration; counts are samples through a network (forward) + samples backpropagated (backward):
#   rollout 8 F;  per step: PPO 4 F + 4 B
#   kl:   + policy 4 F + 4 B, reference 4 F                       -> 8 + 4·(12 F + 8 B)        = 88
#   dmd:  + critic: backward sim 8 F, fake-score loss 8 F + 8 B; DMD: student 4 F + 4 B, real 4 F, fake 4 F
#                                                                  -> 8 + 4·(32 F + 16 B)       = 200
#   dmd, critic_reuse_rollout: no backward simulation             -> 8 + 4·(24 F + 16 B)       = 168
#   dmd, critic_updates = 0                                       -> 8 + 4·(16 F + 8 B)        = 104
#   none                                                          -> 8 + 4·(4 F + 4 B)         = 40
@pytest.mark.parametrize("over,total", [
    (["rl.regularizer=none"], 40),
    (["rl.regularizer=kl"], 88),
    (["rl.regularizer=dmd"], 200),
    (["rl.regularizer=dmd", "rl.critic_reuse_rollout=true"], 168),
    (["rl.regularizer=dmd", "rl.critic_updates=0"], 104),
])
def test_network_evaluations_per_iteration_on_a_known_configuration(teacher, tmp_path, over, total):
    m = _run(teacher, tmp_path, *over)[-1]      # iteration 2 (iteration 1 also has a 2-sample shape probe)
    assert m["nfe_total"] == total and m["nfe_total"] == m["nfe_forward"] + m["nfe_backward"]


def test_critic_updates_knob_counts_critic_steps(teacher, tmp_path):
    m = _run(teacher, tmp_path, "rl.regularizer=dmd", "rl.critic_updates=3", "rl.critic_reuse_rollout=true")[-1]
    assert m["critic_updates"] == 3 * m["ppo_updates"]


@pytest.mark.parametrize("reg", ["none", "kl", "dmd_adv"])
def test_per_term_gradient_norms_and_clip_flag_are_logged(teacher, tmp_path, reg):
    m = _run(teacher, tmp_path, f"rl.regularizer={reg}", "optim.grad_clip=1e-6")[-1]
    assert m["grad_norm_ppo"] > 0 and m["grad_clip_bound"] == 1.0          # a tiny clip binds at every step
    if reg != "none":
        name = "kl" if reg == "kl" else "dmd"
        assert m[f"grad_norm_{name}"] > 0
    m = _run(teacher, tmp_path / "b", f"rl.regularizer={reg}", "optim.grad_clip=1e6")[-1]
    assert m["grad_clip_bound"] == 0.0                                     # a huge one never does


def test_dmd_ca_adv_runs_with_cfg_and_refuses_cfg_1(teacher, tmp_path):
    m = _run(teacher, tmp_path, "rl.regularizer=dmd_ca_adv", "dmd.cfg=2.0")[-1]
    assert m["ca_norm"] > 0 and m["dm_norm"] > 0 and "loss_dmd" in m
    with pytest.raises(UserError, match="dmd.cfg > 1"):
        _run(teacher, tmp_path / "b", "rl.regularizer=dmd_ca_adv", "dmd.cfg=1.0")


def test_dmd_adv_weights_the_dmd_term_by_the_advantage(teacher, tmp_path, monkeypatch):
    import dmdr.train.grpo as grpo

    seen = []
    real = grpo.weighted_dmd_loss
    monkeypatch.setattr(grpo, "weighted_dmd_loss", lambda td, w=None, **k: (seen.append(w), real(td, w, **k))[1])
    _run(teacher, tmp_path, "rl.regularizer=dmd_adv")
    assert seen and all(w is not None and abs(float(w.mean()) - 1) < 1e-5 for w in seen)
    seen.clear()
    _run(teacher, tmp_path / "b", "rl.regularizer=dmd")
    assert seen and all(w is None for w in seen)


def test_four_step_flow_grpo_policy_trains(teacher, tmp_path):
    m = _run(teacher, tmp_path, "generator.steps=4", "rl.sde=flow_grpo", "rl.regularizer=kl")[-1]
    assert m["ppo_updates"] == 2 * 2 * (8 * 4 // 4) and abs(m["mean_ratio"] - 1) < 0.1


@pytest.mark.slow
def test_flow_grpo_on_an_eps_model_is_a_one_line_error(tmp_path):
    """SDXL predicts ε: a multi-step flow_grpo policy is refused with one line and exit 2 (dmd2 is the way)."""
    import subprocess
    import sys

    t = "[to_q, to_k, to_v, to_out.0]"
    cmd = [sys.executable, "-m", "dmdr", "train", str(recipes_dir() / "sd3-medium-grpo.yaml"), "--smoke", "--out",
           str(tmp_path / "run"), "--set", "logging.progress=false", "--set", "model.family=sdxl", "--set",
           "model.config=sdxl-base", "--set", "model.t_min=0.0", "--set", f"generator.lora.targets={t}", "--set",
           f"critic.lora.targets={t}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "rl.sde=dmd2" in err[0] and "Traceback" not in p.stderr


def test_rollout_clean_gives_the_critic_clean_x0_not_the_noisy_final_state():
    """rl.critic_reuse_rollout: per trajectory one of its N clean x̂0 (as the backward simulation), never the final
    state, which carries the last step's exploration noise."""
    from tensordict import TensorDict

    from dmdr import keys as K
    from dmdr.train.grpo import rollout_clean

    B, N = 64, 4
    x0s = torch.arange(B * N, dtype=torch.float64).reshape(B, N, 1, 1, 1).expand(B, N, 1, 2, 2).clone()
    roll = TensorDict({K.X0_PER_STEP: x0s, K.SAMPLE: x0s[:, -1] + 0.1 * torch.randn(B, 1, 2, 2, dtype=torch.float64)},
                      batch_size=[B])
    torch.manual_seed(0)
    out = rollout_clean(roll)
    assert out.shape == (B, 1, 2, 2) and out.dtype == torch.float32 and not out.requires_grad
    step = out[:, 0, 0, 0].double() - torch.arange(B, dtype=torch.float64) * N   # which step each row came from
    assert torch.equal(step, step.round()) and step.min() >= 0 and step.max() <= N - 1
    assert set(step.long().tolist()) == set(range(N))          # all N steps are drawn (64 draws)
    assert not torch.allclose(out.double(), roll[K.SAMPLE])


def test_critic_reuse_trains_the_critic_on_rollout_clean(teacher, tmp_path, monkeypatch):
    import dmdr.train.grpo as grpo

    seen = []
    real = grpo.rollout_clean
    monkeypatch.setattr(grpo, "rollout_clean", lambda roll: seen.append(real(roll)) or seen[-1])
    m = _run(teacher, tmp_path, "rl.regularizer=dmd", "rl.critic_updates=1", "rl.critic_reuse_rollout=true")[-1]
    assert len(seen) == 2 and seen[0].shape[0] == 8 and m["critic_updates"] == m["ppo_updates"]
