"""Typed errors of the event and durable one-way call options: bad values, oversized events, missing extras."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import nats
import pytest
from _support_events import delete_streams

from pikku_mq import (
    ConfigurationError,
    FunctionRegistry,
    MemoryDeploymentService,
    PayloadTooLargeError,
    PikkuWorker,
    event_bus_from_url,
    pikku_sessionless_func,
)
from pikku_mq._durable import MAX_DELIVERY_SECONDS, DeliveryPolicy
from pikku_mq._types import CallRequest
from pikku_mq.transports.jetstream import events_stream, publish_notify

NATS_URL = "nats://127.0.0.1:4222"
AMQP_BUS_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
SUBPROCESS_TIMEOUT = 60.0
"""Seconds for a subprocess that starts Python and imports pikku_mq."""

OVER_MAX_PAYLOAD = "x" * (2 << 20)
"""Data over the 1 MiB default max_payload of nats-server."""


# -- oversized events and one-way calls on NATS --------------------------------------------------------


async def test_oversized_event_raises_payload_too_large() -> None:
    prefix = f"events-config-{uuid.uuid4().hex[:8]}"
    bus = event_bus_from_url(f"{NATS_URL}/{prefix}")
    try:
        with pytest.raises(PayloadTooLargeError) as caught:
            await bus.publish("orders.placed", OVER_MAX_PAYLOAD, timeout=5)
        # The connection survives: a normal event is still stored.
        event_id = await bus.publish("orders.placed", {"order": 1}, timeout=5)
    finally:
        await bus.close()
        await delete_streams([events_stream(prefix)])

    assert caught.value.http_status == 413
    assert "max_payload" in caught.value.message
    assert len(event_id) == 32


async def test_oversized_durable_notify_raises_payload_too_large() -> None:
    nc = await nats.connect(NATS_URL)
    try:
        request = CallRequest("store_order", OVER_MAX_PAYLOAD, {"pikku-call-id": uuid.uuid4().hex})
        with pytest.raises(PayloadTooLargeError):
            await publish_notify(nc, f"events-config-{uuid.uuid4().hex[:8]}", request, timeout=5)
        assert nc.is_connected
    finally:
        await nc.close()


# -- event_bus_from_url ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_age", [-1.0, 0, math.nan, math.inf, "1", True, 60.0])
def test_event_bus_bad_max_age_rejected(max_age: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_age"):
        event_bus_from_url(f"{NATS_URL}/events-config-unused", max_age=max_age)


def test_event_bus_max_age_at_duplicate_window() -> None:
    bus = event_bus_from_url(f"{NATS_URL}/events-config-unused", max_age=120)

    assert bus.max_age == 120.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("url", [123, None, b"nats://127.0.0.1:4222/x"])
def test_event_bus_url_not_string_rejected(url: Any) -> None:
    with pytest.raises(ConfigurationError, match="must be a string"):
        event_bus_from_url(url)


@pytest.mark.parametrize("query", ["exchange=", "exchange=a&exchange=b", "exchange=amq.topic"])
def test_amqp_event_bus_bad_exchange_rejected(query: str) -> None:
    with pytest.raises(ConfigurationError, match="exchange"):
        event_bus_from_url(f"{AMQP_BUS_URL}?{query}")


def test_amqp_event_bus_default_exchange() -> None:
    bus = event_bus_from_url(AMQP_BUS_URL)

    assert bus.exchange == "pikku.events"  # type: ignore[attr-defined]


# -- DeliveryPolicy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["backoff", "max_backoff", "ack_wait"])
@pytest.mark.parametrize("value", ["1", True, None, math.nan, -1.0, 1e300, MAX_DELIVERY_SECONDS + 1])
def test_delivery_policy_bad_seconds_rejected(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=field):
        DeliveryPolicy(**{field: value})


def test_delivery_policy_bounds_accepted() -> None:
    policy = DeliveryPolicy(backoff=0, max_backoff=MAX_DELIVERY_SECONDS, ack_wait=MAX_DELIVERY_SECONDS)

    assert policy.delay(100) <= MAX_DELIVERY_SECONDS


def test_delivery_policy_backoff_over_max_rejected() -> None:
    with pytest.raises(ConfigurationError, match="max_backoff"):
        DeliveryPolicy(backoff=2.0, max_backoff=1.0)


# -- PikkuWorker, the decorator and watch() ------------------------------------------------------------


def worker_with(**options: Any) -> PikkuWorker:
    return PikkuWorker(
        endpoint=f"memory://events-config-{uuid.uuid4().hex[:8]}",
        registry=FunctionRegistry(),
        deployment_service=MemoryDeploymentService(),
        **options,
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("delivery_concurrency", "3"),
        ("delivery_concurrency", True),
        ("delivery_concurrency", 0),
        ("delivery_concurrency", 2.5),
        ("events", 5),
        ("events", ["nats://127.0.0.1:4222/x"]),
        ("durable_notify", "no"),
        ("durable_notify", None),
        ("delivery", {"max_attempts": 3}),
    ],
)
def test_worker_bad_delivery_option_rejected(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        worker_with(**{option: value})


def test_worker_delivery_options_accepted() -> None:
    policy = DeliveryPolicy(max_attempts=2)
    worker = worker_with(delivery=policy, delivery_concurrency=3, durable_notify=False)

    assert worker.delivery is policy
    assert worker.delivery_concurrency == 3


@pytest.mark.parametrize("events", [None, "orders.placed", 5])
def test_decorator_bad_events_rejected(events: Any) -> None:
    registry = FunctionRegistry()
    with pytest.raises(ConfigurationError, match="events"):

        @pikku_sessionless_func(events=events, registry=registry)
        async def handler(services: Any, data: Any) -> None:
            return None


@pytest.mark.parametrize("poll_interval", ["1", True, 1e-9, 0.05])
def test_watch_bad_poll_interval_rejected(poll_interval: Any) -> None:
    with pytest.raises(ConfigurationError, match="poll_interval"):
        MemoryDeploymentService().watch(poll_interval=poll_interval)


def test_watch_default_poll_interval_bounded() -> None:
    service = MemoryDeploymentService(heartbeat_interval=0.01, heartbeat_ttl=1.0)

    assert service.watch().poll_interval == 0.1


def test_cli_ls_watch_tiny_poll_interval_rejected(tmp_path: Any) -> None:
    command = [sys.executable, "-m", "pikku_mq", "ls", "--watch", "--poll-interval", "1e-9"]
    command += ["--discovery", f"sqlite:///{tmp_path / 'registry.db'}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False)

    assert completed.returncode == 2
    assert "--poll-interval: must be at least 0.1 seconds" in completed.stderr


# -- missing extras ----------------------------------------------------------------------------------


def run_without(module: str, code: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python where importing ``module`` fails, as without the extra that brings it."""
    script = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "url", "extra"),
    [("nats", f"{NATS_URL}/events-config", "nats"), ("aio_pika", AMQP_BUS_URL, "amqp")],
)
def test_event_bus_missing_extra_named(module: str, url: str, extra: str) -> None:
    completed = run_without(
        module,
        f"""
        from pikku_mq import ConfigurationError, event_bus_from_url
        try:
            event_bus_from_url({url!r})
        except ConfigurationError as exc:
            print(exc)
        """,
    )

    assert completed.returncode == 0, completed.stderr
    assert f"pip install 'pikku-mq[{extra}]'" in completed.stdout


def test_amqp_event_bus_without_nats() -> None:
    completed = run_without(
        "nats", f"from pikku_mq import event_bus_from_url; print(event_bus_from_url({AMQP_BUS_URL!r}))"
    )

    assert completed.returncode == 0, completed.stderr
    assert "AmqpEventBus(" in completed.stdout


def test_publish_from_env_missing_extra_named() -> None:
    completed = run_without(
        "nats",
        """
        from pikku_mq import ConfigurationError
        from pikku_mq._events import event_bus_from_env
        try:
            event_bus_from_env()
        except ConfigurationError as exc:
            print(exc)
        """,
        env={"PIKKU_EVENTS_URL": f"{NATS_URL}/events-config"},
    )

    assert completed.returncode == 0, completed.stderr
    assert "a nats:// event bus needs nats-py" in completed.stdout
    assert "pip install 'pikku-mq[nats]'" in completed.stdout


@pytest.mark.parametrize(
    ("module", "url", "extra"),
    [("nats", f"{NATS_URL}/events-config", "nats"), ("aio_pika", AMQP_BUS_URL, "amqp")],
)
def test_cli_worker_events_missing_extra_named(tmp_path: Any, module: str, url: str, extra: str) -> None:
    (tmp_path / "handlers.py").write_text(
        textwrap.dedent(
            """
            from pikku_mq import pikku_sessionless_func


            @pikku_sessionless_func(events=["orders.placed"])
            async def on_order(services, data):
                return None
            """
        )
    )
    completed = run_without(
        module,
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from pikku_mq.cli import main
        main(["worker", "handlers", "--endpoint", "http://127.0.0.1:0", "--events", {url!r},
              "--discovery", "sqlite:///{tmp_path / "registry.db"}"])
        """,
    )

    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr, completed.stderr
    assert f"pip install 'pikku-mq[{extra}]'" in completed.stderr
