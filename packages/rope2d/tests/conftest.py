"""fattn-rope2d test settings (the shared fixtures come from tests_shared/plugin.py)."""

import os

# One tiling per kernel and head-dim class instead of autotuning: the GPU suite checks numerics on many
# shapes and dtypes, where autotuning would compile and time every tile for each new N. Benchmarks keep
# the (small) search. Read at each launch, so it does not matter whether fattn.rope2d is already imported.
# An autotune limit given for the run wins, under either name (fattn.core.runtime.autotune_limit).
if "FATTN_ROPE2D_AUTOTUNE" not in os.environ:
    os.environ.setdefault("FATTN_ROPE2D_AUTOTUNE_LIMIT", "1")
