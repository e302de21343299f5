"""User reward plugins: a Python function named `module:function`, loaded once at start-up.

The plugin contract (see examples/plugins/length_penalised.py):

    def score(prompts: list[str], completions: list[str], metadata: list[dict[str, str]]) -> list[float]:
        '''One finite float per sample, in order. metadata[i] holds the dataset's string columns.'''

- Loaded at start-up only: the service process imports it once to fail fast on a typo, and every
  worker process imports it by the same module path when the pool starts. Nothing about the plugin
  ever comes from a request (it is never pickled or named by a caller).
- `plugin_path` (optional) is prepended to sys.path first, e.g. the directory holding my_rewards.py.
- It runs in the worker pool with the same hard timeout as the rules: timeout_seconds per sample
  (a call over k samples gets k times that). A call past it scores failure_reward, failed=True.
- A plugin that raises, returns the wrong number of values, or a non-finite value fails the Score
  call with INTERNAL naming the plugin; the service stays up and the next call works.

No torch here (imported by every worker).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from services.reward.worker import import_target


class PluginOutputError(TypeError):
    """The plugin returned something other than a sequence of numbers."""


def load_plugin(target: str, plugin_path: str | None = None) -> Callable[..., Any]:
    """Import `module:function` (with `plugin_path` on sys.path); ValueError saying what to fix."""
    if plugin_path and plugin_path not in sys.path:
        sys.path.insert(0, plugin_path)
    try:
        return import_target(target, what="reward plugin")
    except ModuleNotFoundError as e:
        where = f" (searched plugin_path={plugin_path!r} first)" if plugin_path else " (set options.plugin_path?)"
        raise ValueError(f"reward plugin {target!r}: cannot import module {e.name!r}{where}") from e


def make_plugin_scorer(settings: dict[str, Any]) -> Callable[[list[str], list[str], list[dict[str, str]]], list[float]]:
    """Worker factory (see `worker.ScorerSpec`): call the plugin on one unit, checking the output's type."""
    fn = load_plugin(settings["target"])

    def scorer(prompts: list[str], completions: list[str], metadata: list[dict[str, str]]) -> list[float]:
        out = fn(list(prompts), list(completions), [dict(m) for m in metadata])
        if isinstance(out, (str, bytes, dict)) or not isinstance(out, Iterable):
            raise PluginOutputError(f"returned a {type(out).__name__}; expected a list of {len(prompts)} floats")
        try:
            return [float(v) for v in out]
        except (TypeError, ValueError) as e:
            raise PluginOutputError(f"returned a value that is not a number ({e})") from None

    return scorer
