"""fattn-swba test settings (the shared fixtures come from tests_shared/plugin.py)."""

import os

# One tiling per kernel and head-dim class instead of autotuning: the GPU suite would otherwise compile
# and time every config for each new shape (minutes). Benchmarks keep the search. Must be set before
# fattn.swba loads (conftest.py is imported before the test modules).
os.environ.setdefault("FATTN_SWBA_AUTOTUNE", "0")
