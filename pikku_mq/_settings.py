"""Settings read from the environment, with their defaults."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_DISCOVERY_FILE", "ENV_DISCOVERY_URL", "default_discovery_url"]

ENV_DISCOVERY_URL = "PIKKU_DISCOVERY_URL"
DEFAULT_DISCOVERY_FILE = "pikku-mq.db"


def default_discovery_url() -> str:
    """Return ``PIKKU_DISCOVERY_URL``, else the SQLite file ``pikku-mq.db`` in the working directory."""
    url = os.environ.get(ENV_DISCOVERY_URL, "").strip()
    if url:
        return url
    return f"sqlite:///{Path.cwd() / DEFAULT_DISCOVERY_FILE}"
