"""A wrong discovery URL fails init() with an error that names the host and database, never the password."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from _support_core import closed_port
from _support_servers import PrivatePostgres, PrivateRedis

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


# -- wrong credentials against servers that check them ------------------------------------------------

REDIS_PASSWORD = "right-staple-7c2e"


@pytest.fixture(scope="module")
def postgres_with_password() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@pytest.fixture(scope="module")
def redis_with_password() -> Iterator[PrivateRedis]:
    with PrivateRedis(password=REDIS_PASSWORD) as server:
        yield server


def _private_postgres_url(server: PrivatePostgres, driver: str, query: bool) -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    role, port = PrivatePostgres.PASSWORD_ROLE, server.port
    if query:
        return f"{scheme}://{role}@127.0.0.1:{port}/{role}?password={SECRET}"
    return f"{scheme}://{role}:{SECRET}@127.0.0.1:{port}/{role}"


# (case, URL builder, the reason the server gives, the database the message must name)
_WRONG_CREDENTIALS: list[tuple[str, Callable[[pytest.FixtureRequest], str], str, str]] = [
    (
        "postgres-wrong-password",
        lambda r: _private_postgres_url(r.getfixturevalue("postgres_with_password"), "", query=False),
        "password authentication failed",
        f"/{PrivatePostgres.PASSWORD_ROLE}",
    ),
    (
        "postgres-password-in-query",
        lambda r: _private_postgres_url(r.getfixturevalue("postgres_with_password"), "", query=True),
        "password authentication failed",
        f"/{PrivatePostgres.PASSWORD_ROLE}",
    ),
    (
        "sqlalchemy-postgres-wrong-password",
        lambda r: _private_postgres_url(r.getfixturevalue("postgres_with_password"), "asyncpg", query=False),
        "password authentication failed",
        f"/{PrivatePostgres.PASSWORD_ROLE}",
    ),
    (
        "sqlalchemy-postgres-password-in-query",
        lambda r: _private_postgres_url(r.getfixturevalue("postgres_with_password"), "asyncpg", query=True),
        "password authentication failed",
        f"/{PrivatePostgres.PASSWORD_ROLE}",
    ),
    (
        "postgres-no-such-database",
        lambda r: f"postgresql://postgres:{SECRET}@127.0.0.1:5432/pikku_no_such_db",
        'database "pikku_no_such_db" does not exist',
        "/pikku_no_such_db",
    ),
    (
        "sqlalchemy-postgres-no-such-role",
        lambda r: f"postgresql+asyncpg://pikku_no_such_role:{SECRET}@127.0.0.1:5432/test",
        'role "pikku_no_such_role" does not exist',
        "/test",
    ),
    (
        "mysql-wrong-user-and-password",
        lambda r: f"mysql+aiomysql://pikku_no_such_user:{SECRET}@127.0.0.1:3306/pikku_nodb",
        "Access denied",
        "/pikku_nodb",
    ),
    (
        "mysql-password-in-query",
        lambda r: f"mysql+aiomysql://pikku_no_such_user@127.0.0.1:3306/pikku_nodb?password={SECRET}",
        "Access denied",
        "/pikku_nodb",
    ),
    (
        "redis-wrong-password",
        lambda r: r.getfixturevalue("redis_with_password").url(SECRET),
        "AuthenticationError",
        "/0",
    ),
    (
        "redis-wrong-user-password",
        lambda r: r.getfixturevalue("redis_with_password").url(SECRET).replace("redis://:", "redis://default:"),
        "AuthenticationError",
        "/0",
    ),
    (
        "redis-password-in-query",
        lambda r: f"{r.getfixturevalue('redis_with_password').url()}?password={SECRET}",
        "AuthenticationError",
        "/0",
    ),
]


@pytest.mark.parametrize(
    ("build_url", "reason", "database"),
    [pytest.param(build, reason, database, id=case) for case, build, reason, database in _WRONG_CREDENTIALS],
)
async def test_wrong_credentials_name_host_not_password(
    request: pytest.FixtureRequest, build_url: Callable[[pytest.FixtureRequest], str], reason: str, database: str
) -> None:
    url = build_url(request)
    service = deployment_service_from_url(url)
    try:
        with pytest.raises(DiscoveryError) as caught:
            await service.init()
    finally:
        await service.close()

    message = str(caught.value)
    assert reason in message
    assert "127.0.0.1" in message
    assert database in message
    assert SECRET not in message
    assert "***" in message
    assert SECRET not in repr(service)


async def test_redis_without_password_names_host(redis_with_password: PrivateRedis) -> None:
    service = deployment_service_from_url(redis_with_password.url())
    try:
        with pytest.raises(DiscoveryError, match="Authentication required") as caught:
            await service.init()
    finally:
        await service.close()

    assert f"127.0.0.1:{redis_with_password.port}/0" in str(caught.value)


@pytest.mark.parametrize("where", ["userinfo", "query"])
@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+asyncpg", "redis"])
async def test_right_password_accepted_and_hidden(request: pytest.FixtureRequest, scheme: str, where: str) -> None:
    # The same servers accept the right password, so the failures above are the password's doing.
    if scheme == "redis":
        port = request.getfixturevalue("redis_with_password").port
        user, password, database = "", REDIS_PASSWORD, "0"
    else:
        port = request.getfixturevalue("postgres_with_password").port
        user, password, database = (
            PrivatePostgres.PASSWORD_ROLE,
            PrivatePostgres.PASSWORD,
            PrivatePostgres.PASSWORD_ROLE,
        )
    if where == "userinfo":
        url = f"{scheme}://{user}:{password}@127.0.0.1:{port}/{database}"
    else:
        url = f"{scheme}://{user}{'@' if user else ''}127.0.0.1:{port}/{database}?password={password}"
    service = deployment_service_from_url(url)
    try:
        await service.init()
        assert await service.find_function("nothing") == []
        assert password not in repr(service)
        assert f"127.0.0.1:{port}/{database}" in repr(service)
    finally:
        await service.close()
