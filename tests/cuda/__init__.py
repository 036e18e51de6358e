"""Tests that need a CUDA device (marked ``cuda``; skipped without one)."""
