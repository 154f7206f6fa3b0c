import math

import pytest
import torch
from tensordict import TensorDict

from dmdr.advantages import (AdvantageKeys, batch_relative, chain, clip_advantage, from_config, group_mean_baseline,
                             group_relative, group_stats, mix_rewards)
from dmdr.keys import MissingKeyError

torch.set_num_threads(1)


def _td(**kw):
    B = len(next(iter(kw.values())))
    return TensorDict({k: torch.as_tensor(v) for k, v in kw.items()}, batch_size=[B])


def test_group_relative_hand_values():
    td = _td(reward=[1.0, 2.0, 3.0, 5.0], group=[0, 0, 1, 1])
    out = group_relative(eps=0.0)(td)
    # group 0: mean 1.5, population std 0.5; group 1: mean 4, std 1
    assert out["advantage"].shape == (4, 1)
    assert torch.allclose(out["advantage"].squeeze(-1), torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_group_relative_unequal_groups_and_singletons():
    td = _td(reward=[1.0, 2.0, 4.0, 10.0], group=[7, 7, 7, 3])   # arbitrary ids, a one-sample group
    a = group_relative(eps=0.0 + 1e-12)(td)["advantage"].squeeze(-1)
    mean, std = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    expect = torch.tensor([(1 - mean) / std, (2 - mean) / std, (4 - mean) / std, 0.0])
    assert torch.allclose(a, expect, atol=1e-6)
    m, s = group_stats(torch.tensor([1.0, 2.0, 4.0, 10.0]), torch.tensor([7, 7, 7, 3]))
    assert torch.allclose(m, torch.tensor([mean, mean, mean, 10.0])) and s[3] == 0


def test_group_mean_baseline_and_batch_relative():
    td = _td(reward=[1.0, 2.0, 3.0, 5.0], group=[0, 0, 1, 1])
    assert torch.allclose(group_mean_baseline()(td)["advantage"].squeeze(-1), torch.tensor([-0.5, 0.5, -1.0, 1.0]))
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    expect = (r - 2.75) / math.sqrt(((r - 2.75) ** 2).mean())
    assert torch.allclose(batch_relative(eps=0.0)(td)["advantage"].squeeze(-1), expect)


def test_clip_and_chain_are_pure_and_ordered():
    td = _td(reward_a=[0.0, 0.0, 0.0, 10.0], group=[0, 0, 0, 0])
    fn = chain(mix_rewards({"a": 1.0}, normalize="none"), group_relative(eps=0.0), clip_advantage(1.5))
    out = fn(td)
    # mean 2.5, std sqrt(3·2.5² + 7.5²)/2 = 4.3301 → [-0.577, -0.577, -0.577, 1.732] → clip at 1.5
    assert torch.allclose(out["advantage"].squeeze(-1), torch.tensor([-0.57735, -0.57735, -0.57735, 1.5]), atol=1e-4)
    assert "advantage" not in td.keys() and "reward" not in td.keys()   # the input is untouched
    assert torch.equal(out["reward_a"], td["reward_a"])                   # raw rewards kept for logging
    with pytest.raises(ValueError):
        clip_advantage(0.0)


def test_mix_rewards_normalises_each_reward_before_weighting():
    td = _td(reward_a=[1.0, 3.0], reward_b=[100.0, 300.0], group=[0, 0])
    none = mix_rewards({"a": 1.0, "b": 0.5}, normalize="none")(td)["reward"]
    assert torch.allclose(none, torch.tensor([1.0 + 50.0, 3.0 + 150.0]))
    batch = mix_rewards({"a": 1.0, "b": 0.5}, normalize="batch", eps=0.0)(td)["reward"]
    assert torch.allclose(batch, torch.tensor([-1.5, 1.5]))   # z-scores ±1 each, weights 1 and 0.5
    td2 = _td(reward_a=[1.0, 3.0, 10.0, 30.0], group=[0, 0, 1, 1])
    grp = mix_rewards({"a": 2.0}, normalize="group", eps=0.0)(td2)["reward"]
    assert torch.allclose(grp, torch.tensor([-2.0, 2.0, -2.0, 2.0]))


def test_missing_key_and_bad_shape_are_clear():
    with pytest.raises(MissingKeyError, match="reward_b"):
        mix_rewards({"b": 1.0})(_td(reward_a=[1.0, 2.0]))
    with pytest.raises(MissingKeyError, match="group"):
        group_relative()(_td(reward=[1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        group_relative()(TensorDict(reward=torch.ones(2, 3), group=torch.zeros(2), batch_size=[2]))


def test_renamed_keys():
    k = AdvantageKeys(reward="r", advantage="adv", group="prompt")
    td = _td(r=[0.0, 2.0], prompt=[5, 5])
    assert torch.allclose(group_relative(eps=0.0, keys=k)(td)["adv"].squeeze(-1), torch.tensor([-1.0, 1.0]))


def test_from_config_matches_the_manual_chain():
    g = torch.Generator().manual_seed(0)
    td = _td(reward_a=torch.randn(12, generator=g), reward_b=torch.randn(12, generator=g) * 50,
             group=torch.arange(3).repeat_interleave(4))
    fn = from_config({"a": 1.0, "b": 0.3}, baseline="group", normalize_rewards="batch", clip=2.0)
    manual = chain(mix_rewards({"a": 1.0, "b": 0.3}), group_relative(), clip_advantage(2.0))
    assert torch.equal(fn(td)["advantage"], manual(td)["advantage"])
    assert fn(td)["advantage"].abs().max() <= 2.0
    with pytest.raises(ValueError, match="baseline"):
        from_config({"a": 1.0}, baseline="nope")
