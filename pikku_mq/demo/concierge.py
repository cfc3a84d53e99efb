"""Serve ``welcome``, which calls ``greet`` and ``shout`` on other instances.

This module does not import the greeter or the shouter, as a separate service would not, so it reads
their results as plain JSON objects.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from pikku_mq import Wire, pikku_sessionless_func


class WelcomeIn(BaseModel):
    name: str


class WelcomeOut(BaseModel):
    message: str
    pids: dict[str, int]
    """Process id of the instance behind each hop: ``welcome``, ``greet`` and ``shout``."""


@pikku_sessionless_func(expose=True)
async def welcome(services: object, data: WelcomeIn, wire: Wire) -> WelcomeOut:
    # greet and shout are not in this process's registry, so their idempotent flag is passed here:
    # it lets the router retry them on another instance if one dies while serving the call.
    greeting: dict[str, Any] = await wire.rpc.remote("greet", {"name": data.name}, idempotent=True)
    shouted: dict[str, Any] = await wire.rpc.remote("shout", {"text": greeting["greeting"]}, idempotent=True)
    return WelcomeOut(
        message=f"{greeting['greeting']} {shouted['text']}",
        pids={"welcome": os.getpid(), "greet": greeting["pid"], "shout": shouted["pid"]},
    )
