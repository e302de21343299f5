"""Reward role: scores samples with a rule, a reward model or a user's plugin (swappable).

`quartet serve reward --set options.kind=rule --set options.rule=arithmetic` answers
`quartet.v1.Reward` (Score, GetInfo). options.py holds the options; backend.py the interface
and the checks every batch goes through; verify.py the worker-process pool with its hard
per-sample timeout; rule.py / sympy_math.py the built-in rules; plugin.py user plugins;
pooled.py the rule and plugin backends on the pool; model.py the reward-model backend;
servicer.py the wire.

This module imports only pydantic: worker processes import the package too.
"""

from __future__ import annotations

from services.reward.options import Options

NAME = "reward"

__all__ = ["NAME", "Options", "create"]


def create(ctx, options: Options):  # -> RewardRole; untyped here so importing the package stays light
    """Build the (not yet loaded) reward role; `load()` starts the backend."""
    from services.reward.servicer import RewardRole

    return RewardRole(ctx, options)
