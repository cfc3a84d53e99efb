"""Call ids and trace ids that the router draws from its buffer of random bytes."""

from __future__ import annotations

import multiprocessing
import os
import re
import threading

import pytest

from pikku_mq._routing import _random_ids

HEX_ID = re.compile(r"[0-9a-f]{32}")


def _draw(count: int, into: list[str]) -> None:
    for _ in range(count):
        into.extend(_random_ids())


def test_ids_unique_across_threads() -> None:
    drawn: list[list[str]] = [[] for _ in range(8)]
    threads = [threading.Thread(target=_draw, args=(1000, ids)) for ids in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [one for ids in drawn for one in ids]

    assert len(every) == 16_000
    assert len(set(every)) == len(every)
    assert all(HEX_ID.fullmatch(one) for one in every)


def _child_ids(queue: multiprocessing.Queue[list[str]]) -> None:
    ids: list[str] = []
    _draw(200, ids)
    queue.put(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs the fork start method")
def test_ids_differ_in_forked_children() -> None:
    _random_ids()  # the parent's buffer contains ids not yet sent
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    children = [context.Process(target=_child_ids, args=(queue,)) for _ in range(3)]
    for child in children:
        child.start()
    received = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=30)
    parent: list[str] = []
    _draw(200, parent)
    every = [one for ids in [*received, parent] for one in ids]

    assert len(every) == 4 * 400
    assert len(set(every)) == len(every)
