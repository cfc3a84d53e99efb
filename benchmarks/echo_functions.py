"""The function the HTTP benchmark calls: it returns its input."""

from typing import Any

from pikku_mq import pikku_sessionless_func


@pikku_sessionless_func(expose=True, idempotent=True)
async def echo(services: Any, data: dict[str, Any]) -> dict[str, Any]:
    return data
