"""fattn-swba test settings (the shared fixtures come from tests_shared/plugin.py)."""

import os

# One tiling per kernel and head-dim class instead of autotuning: the GPU suite would otherwise compile
# and time every config for each new shape (minutes). Benchmarks keep the search. An autotune limit
# given for the run wins, under either name (fattn.core.runtime.autotune_limit).
if "FATTN_SWBA_AUTOTUNE" not in os.environ:
    os.environ.setdefault("FATTN_SWBA_AUTOTUNE_LIMIT", "1")
