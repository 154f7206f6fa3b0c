"""The TensorDict key names every dmdr module reads and writes: one place to look them up.

Functions that read a TensorDict take a ``keys=`` argument (a small frozen dataclass whose fields default to
these names), so any key can be renamed without touching the function. A missing key raises
:class:`MissingKeyError`, which names the key, the function and how to rename it.

Shapes use B = batch, N = number of generator steps, C/H/W = sample shape.
"""
from __future__ import annotations

from tensordict import TensorDictBase

# ---- samples and noise -------------------------------------------------------------------------------------
X0 = "x0"                      # (B,C,H,W) a clean sample (data or a generator output)
NOISE = "noise"                # (B,C,H,W) Gaussian noise used to renoise x0
X_T = "x_t"                    # (B,C,H,W) a noisy sample
T = "t"                        # (B,) time in [0,1]; t = 1 is pure noise (flow-matching convention)
COND = "cond"                  # (B,...) conditioning: class labels (B,) or a TensorDict of embeddings
UNCOND = "uncond"              # (B,...) the null conditioning used by classifier-free guidance

# ---- generator -----------------------------------------------------------------------------------------------
X0_PRED = "x0_pred"            # (B,C,H,W) generator's one-step prediction x̂0, differentiable w.r.t. θ
X0_PER_STEP = "x0_per_step"    # (B,N,C,H,W) x̂0 after each few-step rollout step
X_PER_STEP = "x_per_step"      # (B,N,C,H,W) rollout state fed to the generator at each step
GRID = "grid"                  # (B,N+1) the few-step time grid t_0..t_N (same for every sample)
SAMPLE = "sample"              # (B,C,H,W) the final few-step sample
STEP_INDEX = "step_index"      # (B,) which grid step a sample was drawn from

# ---- scores --------------------------------------------------------------------------------------------------
X0_REAL = "x0_real"            # (B,C,H,W) real-score (teacher, CFG) denoised estimate at x_τ, no grad
X0_FAKE = "x0_fake"            # (B,C,H,W) fake-score (critic) denoised estimate at x_τ, no grad
FAKE_PRED = "fake_pred"        # (B,C,H,W) critic's prediction (its parameterisation) on renoised samples
FAKE_TARGET = "fake_target"    # (B,C,H,W) the denoising target for FAKE_PRED

# ---- rewards / RL --------------------------------------------------------------------------------------------
REWARD = "reward"              # (B,) a reward; per-reward values use REWARD + "_" + name
ADVANTAGE = "advantage"        # (B,1) advantage (torchrl convention)
LOG_PROB = "log_prob"          # (B,N) per-step Gaussian log-probabilities of a stochastic rollout
ACTION = "action"              # (B,C,H,W) a sampled transition target x_{i+1}
GROUP = "group"                # (B,) group id for group-relative advantages


def reward_key(name: str) -> str:
    """``reward_<name>``: the per-sample value of one named reward, shape (B,)."""
    return f"{REWARD}_{name}"


class MissingKeyError(KeyError):
    """A TensorDict lacks a key a function needs. The message names the key and how to rename it."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a readable sentence
        return str(self.args[0])


def require(td: TensorDictBase, key: str, *, fn: str, field: str):
    """Return ``td[key]`` or raise :class:`MissingKeyError` naming ``fn``, the missing key and the rename hook."""
    if key not in td.keys(include_nested=True):
        have = sorted(str(k) for k in td.keys())
        raise MissingKeyError(
            f"{fn} needs key {key!r} in the TensorDict (rename with keys=...({field}='your_key')); it has {have}"
        )
    return td.get(key)
