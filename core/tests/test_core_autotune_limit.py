"""autotune_limit: which environment variable wins, the older per-package names, and bad values."""

from __future__ import annotations

import pytest

from fattn.core import autotune_limit

_LEGACY = {"swba": "FATTN_SWBA_AUTOTUNE", "rope2d": "FATTN_ROPE2D_AUTOTUNE", "msda": "FATTN_MSDA_AUTOTUNE",
           "fp8": "FATTN_FP8_TUNE_LIMIT"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The package test suites' conftests may have set limits in this process.
    for pkg, legacy in _LEGACY.items():
        monkeypatch.delenv(legacy, raising=False)
        monkeypatch.delenv(f"FATTN_{pkg.upper()}_AUTOTUNE_LIMIT", raising=False)
    monkeypatch.delenv("FATTN_AUTOTUNE_LIMIT", raising=False)


def test_default_is_no_limit() -> None:
    assert autotune_limit("swba") == 0
    assert autotune_limit("deform") == 0  # a package without an older variable


def test_package_variable_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FATTN_SWBA_AUTOTUNE_LIMIT", "3")
    assert autotune_limit("swba") == 3
    assert autotune_limit("rope2d") == 0  # other packages unaffected
    monkeypatch.setenv("FATTN_SWBA_AUTOTUNE_LIMIT", "0")
    assert autotune_limit("swba") == 0


@pytest.mark.parametrize("pkg", ["swba", "rope2d", "msda"])
def test_legacy_switches(pkg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_LEGACY[pkg], "0")  # off: the first config only
    assert autotune_limit(pkg) == 1
    monkeypatch.setenv(_LEGACY[pkg], "1")  # on: every config
    assert autotune_limit(pkg) == 0


def test_legacy_fp8_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FATTN_FP8_TUNE_LIMIT", "4")
    assert autotune_limit("fp8") == 4


def test_precedence_package_then_legacy_then_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FATTN_AUTOTUNE_LIMIT", "5")
    assert autotune_limit("msda") == 5
    assert autotune_limit("deform") == 5
    monkeypatch.setenv("FATTN_MSDA_AUTOTUNE", "1")  # legacy "all" beats the global limit
    assert autotune_limit("msda") == 0
    monkeypatch.setenv("FATTN_MSDA_AUTOTUNE_LIMIT", "2")  # the new name beats both
    assert autotune_limit("msda") == 2
    monkeypatch.setenv("FATTN_MSDA_AUTOTUNE_LIMIT", "")  # empty counts as unset
    assert autotune_limit("msda") == 0


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("FATTN_SWBA_AUTOTUNE_LIMIT", "-1", "non-negative integer"),
    ("FATTN_SWBA_AUTOTUNE_LIMIT", "two", "non-negative integer"),
    ("FATTN_AUTOTUNE_LIMIT", "1.5", "non-negative integer"),
    ("FATTN_FP8_TUNE_LIMIT", "-2", "non-negative integer"),
    ("FATTN_SWBA_AUTOTUNE", "yes", "0 (first config only) or 1"),
])
def test_invalid_values_raise(name: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    pkg = "fp8" if name.startswith("FATTN_FP8") else "swba"
    with pytest.raises(ValueError, match=name) as err:
        autotune_limit(pkg)
    assert expected in str(err.value)


@pytest.mark.parametrize(("value", "expected"), [("", True), ("1", True), ("On", True), ("no", False), ("0", False)])
def test_env_flag_reads_switches(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from fattn.core.runtime import env_flag

    monkeypatch.setenv("FATTN_TEST_FLAG", value)
    assert env_flag("FATTN_TEST_FLAG", True) is expected


def test_env_flag_rejects_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    """FATTN_EAGER_FAST_PATH / FATTN_FAST_LAUNCH go through env_flag: a typo is an error, not the default."""
    from fattn.core.runtime import env_flag

    monkeypatch.setenv("FATTN_FAST_LAUNCH", "ture")
    with pytest.raises(ValueError, match="FATTN_FAST_LAUNCH='ture'"):
        env_flag("FATTN_FAST_LAUNCH", False)
