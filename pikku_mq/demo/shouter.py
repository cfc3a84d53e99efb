"""Serve ``shout``: ``pikku-mq worker pikku_mq.demo.shouter``."""

from __future__ import annotations

import os

from pydantic import BaseModel

from pikku_mq import pikku_sessionless_func


class ShoutIn(BaseModel):
    text: str


class ShoutOut(BaseModel):
    text: str
    pid: int
    """Process id of the instance that served the call."""


@pikku_sessionless_func(expose=True, idempotent=True)
async def shout(services: object, data: ShoutIn) -> ShoutOut:
    return ShoutOut(text=data.text.upper(), pid=os.getpid())
