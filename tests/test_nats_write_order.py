"""Messages from one _Client arrive whole and in order, whether the client or nats-py's flusher wrote them.

Several tasks publish numbered messages of mixed sizes on one connection, with ``write_at_once`` set
at random and busy spins that hold the event loop past the client's hold time, so the client's own
writes and the flusher's interleave. A receiving client checks each subject's numbers and bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time

import pytest
from _support_core import wait_until
from _support_servers import PrivateNats

from pikku_mq.transports.nats import _MAX_HOLD, _Client, _close_client, _ignore, _open_client

TASKS = 4
MESSAGES = 150


def _body(task: int, seq: int, size: int) -> bytes:
    head = f"{task}:{seq}:{size}:".encode()
    fill = hashlib.sha256(head).digest() * (size // 32 + 1)
    return head + fill[: max(0, size - len(head))]


async def _connect(url: str) -> _Client:
    return await _open_client(
        url, name="order", connect_timeout=2, on_disconnected=_ignore, on_reconnected=_ignore, on_closed=_ignore
    )


@pytest.mark.parametrize("freeze", [False, True], ids=["steady", "server-frozen"])
async def test_mixed_writes_keep_order_and_bytes(private_nats: PrivateNats, freeze: bool) -> None:
    sender = await _connect(private_nats.url)
    receiver = await _connect(private_nats.url)
    last: dict[str, int] = {}
    problems: list[str] = []
    received = 0

    def check(subject: str, reply: str, data: bytes, headers: object) -> None:
        nonlocal received
        task, seq, size, _ = data.split(b":", 3)
        if data != _body(int(task), int(seq), int(size)):
            problems.append(f"{subject} #{int(seq)}: bytes differ")
        if int(seq) != last.get(subject, -1) + 1:
            problems.append(f"{subject}: #{int(seq)} after #{last.get(subject, -1)}")
        last[subject] = int(seq)
        received += 1

    try:
        await receiver.subscribe_direct("order.*", check)
        await receiver.flush(timeout=2)  # pikku_mq's client sends PING after the SUB

        async def publish(task: int) -> None:
            rnd = random.Random(task)
            for seq in range(MESSAGES):
                size = rnd.choice([100, 512 * 1024, rnd.randint(1_000, 700 * 1024)]) if rnd.random() < 0.1 else 100
                sender.write_at_once = rnd.random() < 0.3
                try:
                    await sender.publish(f"order.{task}", _body(task, seq, size))
                finally:
                    sender.write_at_once = False
                pause = rnd.random()
                if pause < 0.2:
                    # Hold the loop past the hold time, so the next publish writes the buffer itself.
                    busy_until = time.perf_counter() + 2 * _MAX_HOLD
                    while time.perf_counter() < busy_until:
                        pass
                elif pause < 0.6:
                    await asyncio.sleep(0)

        async def freeze_server() -> None:
            assert private_nats.process is not None
            await asyncio.sleep(0.05)
            os.kill(private_nats.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.5)
            finally:
                os.kill(private_nats.process.pid, signal.SIGCONT)

        jobs = [publish(task) for task in range(TASKS)]
        if freeze:
            jobs.append(freeze_server())
        await asyncio.wait_for(asyncio.gather(*jobs), 30)
        await sender.flush(timeout=5)
        await wait_until(lambda: received == TASKS * MESSAGES or bool(problems), timeout=20)
    finally:
        await _close_client(sender)
        await _close_client(receiver)

    assert problems == []
    assert received == TASKS * MESSAGES
    assert last == {f"order.{task}": MESSAGES - 1 for task in range(TASKS)}
