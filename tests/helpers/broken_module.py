"""Fails at import time, for the python runner's import-error test."""

raise RuntimeError("broken at import\nsecond line")
