"""Test support shared by every fattn package's tests (not shipped in any distribution)."""
