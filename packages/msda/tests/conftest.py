"""fattn-msda test settings (the shared fixtures come from tests_shared/plugin.py)."""

import os

# A few tilings instead of the full autotuning space: the GPU suite would otherwise compile a dozen
# configs for every new shape. Benchmarks keep the full search. Must be set before fattn.msda loads.
# An autotune limit given for the run wins, under either name (fattn.core.runtime.autotune_limit).
if "FATTN_MSDA_AUTOTUNE" not in os.environ:
    os.environ.setdefault("FATTN_MSDA_AUTOTUNE_LIMIT", "1")
