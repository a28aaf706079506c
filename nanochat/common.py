"""
Small shared facts of the nanochat world that need no torch: where the base directory is.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BASE_DIR = Path("~/.cache/nanochat")


def get_base_dir() -> Path:
    """$NANOCHAT_BASE_DIR, else ~/.cache/nanochat (upstream's default). Not created here."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    return Path(env).expanduser() if env else DEFAULT_BASE_DIR.expanduser()
