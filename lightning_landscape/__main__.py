"""``python -m lightning_landscape``: the same command as ``lightning-landscape``."""

from __future__ import annotations

from lightning_landscape.cli import entry

if __name__ == "__main__":
    entry()
