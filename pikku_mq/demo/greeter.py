"""Serve ``greet``: ``pikku-mq worker pikku_mq.demo.greeter``."""

from __future__ import annotations

import os

from pydantic import BaseModel

from pikku_mq import pikku_sessionless_func


class GreetIn(BaseModel):
    name: str


class GreetOut(BaseModel):
    greeting: str
    pid: int
    """Process id of the instance that served the call."""


# Idempotent: greeting twice has no side effect, so a caller may retry it on another instance after a
# failure that leaves it unknown whether the first instance ran it (a crash mid-call).
@pikku_sessionless_func(expose=True, idempotent=True)
async def greet(services: object, data: GreetIn) -> GreetOut:
    return GreetOut(greeting=f"Hello, {data.name}!", pid=os.getpid())
