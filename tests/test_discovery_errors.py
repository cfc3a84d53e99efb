"""A wrong discovery URL fails init() with an error that names the host and database, never the password."""

from __future__ import annotations

import pytest
from _support_core import closed_port

from pikku_mq import DiscoveryError, deployment_service_from_url

SECRET = "sekret-4f1b"


def _urls() -> list[str]:
    port = closed_port()
    return [
        f"postgresql://root:{SECRET}@127.0.0.1:{port}/pikku_nodb",
        f"postgresql://pikku_no_such_role:{SECRET}@127.0.0.1:5432/test",
        f"postgresql+asyncpg://root:{SECRET}@127.0.0.1:{port}/pikku_nodb",
        f"mysql+aiomysql://root:{SECRET}@127.0.0.1:{port}/pikku_nodb",
        f"redis://:{SECRET}@127.0.0.1:{port}/0",
    ]


@pytest.mark.parametrize("url", _urls())
async def test_bad_url_names_host_not_password(url: str) -> None:
    service = deployment_service_from_url(url)
    try:
        with pytest.raises(DiscoveryError) as caught:
            await service.init()
    finally:
        await service.close()

    message = str(caught.value)
    assert "127.0.0.1" in message
    assert SECRET not in message
    assert SECRET not in repr(service)
    assert "***" in message
    if "redis" not in url:
        assert ("/pikku_nodb" in message) or ("/test" in message)
