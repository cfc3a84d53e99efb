"""Settings read from the environment, with their defaults."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_AMQP_URL",
    "DEFAULT_DISCOVERY_FILE",
    "DEFAULT_NATS_URL",
    "ENV_AMQP_URL",
    "ENV_DISCOVERY_URL",
    "ENV_HOSTNAME",
    "ENV_METRICS",
    "ENV_METRICS_HOST",
    "ENV_METRICS_PORT",
    "ENV_NATS_URL",
    "ENV_REMOTE_SECRET",
    "ENV_REMOTE_SECRET_PREVIOUS",
    "default_amqp_url",
    "default_discovery_url",
    "default_nats_url",
]

ENV_DISCOVERY_URL = "PIKKU_DISCOVERY_URL"
DEFAULT_DISCOVERY_FILE = "pikku-mq.db"
ENV_NATS_URL = "PIKKU_NATS_URL"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
ENV_AMQP_URL = "PIKKU_AMQP_URL"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ENV_REMOTE_SECRET = "PIKKU_REMOTE_SECRET"  # noqa: S105 - the variable name, not a secret
ENV_REMOTE_SECRET_PREVIOUS = "PIKKU_REMOTE_SECRET_PREVIOUS"  # noqa: S105 - the variable name
ENV_HOSTNAME = "PIKKU_HOSTNAME"
ENV_METRICS = "PIKKU_METRICS"
"""Set to 1 (or true, yes, on) to turn on metrics in the global Prometheus registry."""
ENV_METRICS_PORT = "PIKKU_METRICS_PORT"
"""A port on which a worker serves its metrics by itself; setting it turns metrics on."""
ENV_METRICS_HOST = "PIKKU_METRICS_HOST"
"""The address the metrics port listens on; 127.0.0.1 by default."""


def default_discovery_url() -> str:
    """Return ``PIKKU_DISCOVERY_URL``, else the SQLite file ``pikku-mq.db`` in the working directory."""
    url = os.environ.get(ENV_DISCOVERY_URL, "").strip()
    if url:
        return url
    return f"sqlite:///{Path.cwd() / DEFAULT_DISCOVERY_FILE}"


def default_nats_url(fallback: str = DEFAULT_NATS_URL) -> str:
    """Return ``PIKKU_NATS_URL``, else ``fallback`` (by default ``nats://127.0.0.1:4222``).

    The URL may list several servers separated by commas and may carry credentials
    (``nats://user:password@host:4222``). It is only used to connect and is never advertised.
    """
    url = os.environ.get(ENV_NATS_URL, "").strip()
    return url or fallback


def default_amqp_url() -> str:
    """Return ``PIKKU_AMQP_URL``, else RabbitMQ's local default ``amqp://guest:guest@127.0.0.1:5672/``."""
    return os.environ.get(ENV_AMQP_URL, "").strip() or DEFAULT_AMQP_URL
