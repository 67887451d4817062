"""Tests of the lmms-eval integration (a package, so that its conftest does not shadow tests/conftest.py)."""
