"""bench/rl_frontier.py: the sweep it runs and the matched-reward-gain comparison it reports."""
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rl_frontier", ROOT / "bench" / "rl_frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(bench, *argv):
    import argparse

    ns = argparse.Namespace(regularisers=["none", "kl", "dmd", "dmd_adv"], lambdas=[0.3, 1.0, 3.0, 10.0, 30.0],
                            betas=[0.01, 0.03, 0.1, 0.3, 1.0], cfg=2.0, critic_updates=None, critic_reuse=False,
                            only=None)
    for k, v in argv:
        setattr(ns, k, v)
    return ns


def test_the_sweep_is_5_lambdas_and_5_betas(bench):
    s = bench.settings(_args(bench))
    assert len(s) == 1 + 5 + 5 + 5
    assert s["kl_b0.03"] == ["rl.regularizer=kl", "rl.kl_weight=0.03"]
    assert s["dmd_adv_l30"][:2] == ["rl.regularizer=dmd_adv", "rl.reg_weight=30.0"]
    ca = bench.settings(_args(bench, ("regularisers", ["dmd_ca_adv"]), ("critic_updates", 1), ("critic_reuse", True)))
    assert ca["dmd_ca_adv_l1"] == ["rl.regularizer=dmd_ca_adv", "rl.reg_weight=1.0", "dmd.cfg=2.0",
                                   "rl.critic_updates=1", "rl.critic_reuse_rollout=true"]
    with pytest.raises(SystemExit, match="--only"):
        bench.settings(_args(bench, ("only", ["kl_b7"])))


def test_matched_reward_gain_interpolates_along_each_sweep(bench):
    def row(g, f):
        return {"reward_gain": {"mean": g}, "fid": {"mean": f}}

    table = {"kl_b1": row(0.0, 1.0), "kl_b0.1": row(0.2, 2.0), "dmd_l10": row(0.1, 1.5), "dmd_l1": row(0.3, 1.7)}
    m = bench.matched(table, 0.15, "fid")
    assert m["kl"] == pytest.approx(1.75) and m["dmd"] == pytest.approx(1.55)
    assert math.isnan(bench.matched(table, 0.35, "fid")["kl"])      # outside the sweep: not extrapolated


def test_mean_ci_uses_the_t_interval(bench):
    r = bench.mean_ci([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["n"] == 3 and r["ci95"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))
