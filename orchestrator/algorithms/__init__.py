"""The RL math's public names, kept importable from here for code written against earlier releases.

The functions live in the top-level ``rl`` package (pure torch, shared with the value service).
"""

from rl import *  # noqa: F403
from rl import __all__  # noqa: F401
