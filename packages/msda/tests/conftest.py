"""fattn-msda test settings (the shared fixtures come from tests_shared/plugin.py)."""

import os

# A few tilings instead of the full autotuning space: the GPU suite would otherwise compile a dozen
# configs for every new shape. Benchmarks keep the full search. Must be set before fattn.msda loads.
os.environ.setdefault("FATTN_MSDA_AUTOTUNE", "0")
