"""fattn-fp8 tests: autotune over one config per kernel and shape (a GPU run compiles every config it
tunes, and the full lists would take minutes); with TMA descriptors that is a TMA config, else the
128-row one. `test_every_tuned_config_is_correct` still runs every config. FATTN_FP8_AUTOTUNE_LIMIT=0
(or the older FATTN_FP8_TUNE_LIMIT=0) before pytest tunes over all of them."""

import os

if "FATTN_FP8_TUNE_LIMIT" not in os.environ:  # the older name, still honoured
    os.environ.setdefault("FATTN_FP8_AUTOTUNE_LIMIT", "1")
