"""Rewards: a registry of named, self-describing reward models (see :mod:`dmdr.rewards.base`)."""
from dmdr.rewards.base import Reward, RewardSpec, UnknownRewardError, available_rewards, build_reward, register_reward

__all__ = ["Reward", "RewardSpec", "UnknownRewardError", "available_rewards", "build_reward", "register_reward"]
