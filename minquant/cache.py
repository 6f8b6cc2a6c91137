"""Where minquant keeps what it builds on this machine: dequantized packaged models, compiled CPU kernels.

One setting, `MINQUANT_CACHE`: a folder (default ~/.cache/minquant), or "off" to keep nothing.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path | None:
    """The cache folder (not created here), or None when MINQUANT_CACHE=off."""
    setting = os.environ.get("MINQUANT_CACHE", "")
    if setting.lower() == "off":
        return None
    return Path(setting or Path.home() / ".cache" / "minquant").expanduser()
