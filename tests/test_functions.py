"""Function definitions: decorators, validation of input and output against type hints, serialisation.

This module uses postponed annotations, so every hint below is a string resolved in the module's globals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pydantic
import pytest
from _support_core import Mesh
from typing_extensions import TypedDict  # pydantic needs this TypedDict before Python 3.12

from pikku_mq import (
    RPC,
    ConfigurationError,
    FunctionDefinition,
    FunctionRegistry,
    InputValidationError,
    MissingSessionError,
    OutputValidationError,
    PikkuWorker,
    UnprocessableContentError,
    Wire,
    default_registry,
    pikku_func,
    pikku_sessionless_func,
    testing,
)

REG = FunctionRegistry()


class Point(pydantic.BaseModel):
    x: int
    y: int


@dataclasses.dataclass
class Box:
    width: float
    height: float


class Person(TypedDict):
    name: str
    age: int


class Summary(pydantic.BaseModel):
    kind: str
    total: float


@pikku_sessionless_func(expose=True, registry=REG)
async def sum_point(services: Any, data: Point, wire: Wire) -> Summary:
    return Summary(kind=type(data).__name__, total=data.x + data.y)


@pikku_sessionless_func(expose=True, registry=REG)
async def box_area(services: Any, data: Box) -> Summary:
    return Summary(kind=type(data).__name__, total=data.width * data.height)


@pikku_sessionless_func(expose=True, registry=REG)
async def next_age(services: Any, data: Person) -> Person:
    return Person(name=data["name"], age=data["age"] + 1)


@pikku_sessionless_func(expose=True, registry=REG)
async def total(services: Any, data: list[int]) -> int:
    return sum(data)


@pikku_sessionless_func(expose=True, registry=REG)
async def wrong_output(services: Any, data: Any) -> int:
    return "not a number"  # type: ignore[return-value]


@pikku_sessionless_func(expose=True, registry=REG)
async def opaque_any(services: Any, data: Any) -> Any:
    return object()


@pikku_sessionless_func(expose=True, registry=REG)
async def opaque_unhinted(services, data):  # type: ignore[no-untyped-def]
    return {"value": object()}


@pikku_sessionless_func(expose=True, registry=REG)
async def nothing(services: Any, data: Any) -> None:
    return None


@pikku_sessionless_func(expose=True, registry=REG)
async def only_services(services: Any) -> str:
    return f"services={services}"


@pikku_sessionless_func(expose=True, registry=REG)
async def services_and_data(services: Any, data: int) -> int:
    return data * 2


@pikku_sessionless_func(expose=True, registry=REG)
async def wire_details(services: Any, data: Any, wire: Wire) -> dict[str, Any]:
    return {"trace_id": wire.trace_id, "call_id": wire.call_id, "hop": wire.hop, "has_rpc": wire.rpc is not None}


@pikku_func(registry=REG)
async def whoami(services: Any, data: Any, wire: Wire) -> Any:
    return wire.session


@pikku_sessionless_func(name="public_name", idempotent=True, registry=REG)
async def internal_name(services: Any, data: Any) -> str:
    return "renamed"


@pikku_func(expose=True, idempotent=True, auth=True, registry=REG)
async def all_flags(services: Any, data: Any) -> None:
    return None


@pikku_sessionless_func(registry=REG)
async def plain_default(services: Any, data: Any) -> None:
    return None


def _definition(func: Any) -> FunctionDefinition:
    definition = func.__pikku__
    assert isinstance(definition, FunctionDefinition)
    return definition


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


@pytest.fixture
async def remote(mesh: Mesh) -> AsyncIterator[RPC]:
    """An RPC that calls this module's exposed functions on an HTTP worker and has none locally."""
    async with PikkuWorker(endpoint="http://127.0.0.1:0", registry=REG, deployment_service=mesh.service()):
        yield RPC(registry=FunctionRegistry(), deployment_service=mesh.service())


# -- decorators ----------------------------------------------------------------------------------------


def test_decorator_flags() -> None:
    flags = _definition(all_flags)
    assert (flags.expose, flags.idempotent, flags.auth) == (True, True, True)

    default = _definition(plain_default)
    assert (default.expose, default.idempotent, default.auth) == (False, False, False)

    session = _definition(whoami)
    assert (session.expose, session.idempotent, session.auth) == (False, False, True)


def test_decorator_name() -> None:
    assert REG.get("public_name") is _definition(internal_name)
    assert REG.get("internal_name") is None
    assert _definition(internal_name).idempotent is True


def test_decorator_registry_contents() -> None:
    assert REG.get("sum_point") is _definition(sum_point)
    assert "all_flags" in REG
    assert "plain_default" not in REG.exposed_names()
    assert "whoami" not in REG.exposed_names()
    assert REG.exposed_names() == sorted(REG.exposed_names())


def test_decorator_empty_registry() -> None:
    # An empty registry is falsy (it has a length): it must still be the one used.
    empty = FunctionRegistry()

    async def empty_registry_probe(services: Any) -> None:
        return None

    pikku_sessionless_func(registry=empty)(empty_registry_probe)

    assert "empty_registry_probe" in empty
    assert "empty_registry_probe" not in default_registry


def test_worker_empty_registry() -> None:
    worker = PikkuWorker(endpoint="memory://functions-empty", registry=FunctionRegistry(), discovery=False)

    assert len(worker.registry) == 0
    assert worker.registry is not default_registry


def test_decorator_bare_uses_default() -> None:
    async def bare_default_probe(services: Any) -> None:
        return None

    try:
        decorated = pikku_func(bare_default_probe)
        assert decorated is bare_default_probe
        assert default_registry.get("bare_default_probe") is _definition(bare_default_probe)
        assert _definition(bare_default_probe).auth is True
    finally:
        default_registry._functions.pop("bare_default_probe", None)


async def test_direct_call_unchanged() -> None:
    result = await sum_point(None, Point(x=2, y=3), None)  # type: ignore[arg-type]

    assert result == Summary(kind="Point", total=5)
    assert await only_services("svc") == "services=svc"


def test_sync_function_rejected() -> None:
    def sync_function(services: Any, data: Any) -> None:
        return None

    with pytest.raises(TypeError, match="must be an 'async def' function"):
        pikku_func(registry=REG)(sync_function)  # type: ignore[type-var]
    assert "sync_function" not in REG


async def no_parameters() -> None:
    return None


async def four_parameters(services: Any, data: Any, wire: Any, extra: Any) -> None:
    return None


@pytest.mark.parametrize(("func", "count"), [(no_parameters, 0), (four_parameters, 4)])
def test_wrong_arity_rejected(func: Any, count: int) -> None:
    with pytest.raises(TypeError, match=f"it takes {count} positional parameters"):
        pikku_sessionless_func(registry=REG)(func)
    assert func.__name__ not in REG


def test_keyword_parameters_not_counted() -> None:
    async def keyword_extra(services: Any, data: Any, wire: Any, *, verbose: bool = False) -> None:
        return None

    registry = FunctionRegistry()
    pikku_sessionless_func(registry=registry)(keyword_extra)

    assert _definition(keyword_extra).arity == 3


def test_duplicate_name_rejected() -> None:
    async def impostor(services: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="function name 'total' is already registered") as caught:
        pikku_sessionless_func(name="total", registry=REG)(impostor)

    message = str(caught.value)
    assert "test_functions.total" in message
    assert "impostor" in message
    assert "pass name=" in message
    assert REG.get("total") is _definition(total)


def test_same_function_registered_again() -> None:
    # Registering the same function again (a module imported twice) is not a conflict.
    REG.add(_definition(total))

    assert REG.get("total") is _definition(total)


def test_duplicate_name_in_other_registry() -> None:
    other = FunctionRegistry()

    async def total(services: Any) -> int:
        return 0

    pikku_sessionless_func(registry=other)(total)

    assert other.get("total") is not REG.get("total")


def test_unresolvable_hint_rejected() -> None:
    async def broken_hint(services: Any, data: NoSuchModel) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(TypeError, match="cannot resolve the type hint 'NoSuchModel'"):
        pikku_sessionless_func(registry=REG)(broken_hint)


class Pending(pydantic.BaseModel):
    """A model whose field refers to a class defined further down, so its schema is built on first use."""

    child: Later | None = None


PENDING_REG = FunctionRegistry()


@pikku_sessionless_func(registry=PENDING_REG, expose=True)
async def nest(services: Any, data: Pending) -> Pending:
    return data


PENDING_AT_DEFINITION = not PENDING_REG.get("nest").input_adapter.pydantic_complete  # type: ignore[union-attr]


class Later(pydantic.BaseModel):
    n: int


async def test_model_completed_after_definition() -> None:
    definition = PENDING_REG.get("nest")
    assert definition is not None

    result = await RPC(registry=PENDING_REG).invoke("nest", {"child": {"n": "7"}})
    with pytest.raises(InputValidationError, match=r"child\.n"):
        await RPC(registry=PENDING_REG).invoke("nest", {"child": {"n": "seven"}})

    assert PENDING_AT_DEFINITION, "the adapter should have waited for Later"
    assert result == Pending(child=Later(n=7))
    assert definition.dump_json(result) == b'{"child":{"n":7}}'


# -- input validation --------------------------------------------------------------------------------


async def test_input_pydantic_model() -> None:
    result = await RPC(registry=REG).invoke("sum_point", {"x": 2, "y": "40"})

    assert result == Summary(kind="Point", total=42)


async def test_input_dataclass() -> None:
    result = await RPC(registry=REG).invoke("box_area", {"width": 2, "height": 1.5})

    assert result == Summary(kind="Box", total=3.0)


async def test_input_typeddict() -> None:
    result = await RPC(registry=REG).invoke("next_age", {"name": "Ada", "age": "36"})

    assert result == {"name": "Ada", "age": 37}


async def test_input_plain_type() -> None:
    assert await RPC(registry=REG).invoke("total", [1, 2, "3"]) == 6


async def test_input_model_instance_accepted() -> None:
    result = await RPC(registry=REG).invoke("sum_point", Point(x=1, y=1))

    assert result.total == 2


async def test_invalid_input_names_fields() -> None:
    with pytest.raises(InputValidationError) as caught:
        await RPC(registry=REG).invoke("sum_point", {"x": "abc"})

    error = caught.value
    assert isinstance(error, UnprocessableContentError)
    assert error.status == 422
    assert error.code == "invalid_input"
    assert "sum_point" in error.message
    assert "x:" in error.message
    assert "y:" in error.message
    assert [entry["loc"] for entry in error.payload] == [["x"], ["y"]]
    assert [entry["type"] for entry in error.payload] == ["int_parsing", "missing"]


@pytest.mark.parametrize(
    ("name", "data", "location"),
    [
        ("box_area", {"width": "wide", "height": 1}, ["width"]),
        ("next_age", {"name": "Ada"}, ["age"]),
        ("total", [1, "two"], [1]),
        ("total", "not a list", []),
        ("services_and_data", None, []),
    ],
)
async def test_invalid_input_kinds(name: str, data: Any, location: list[Any]) -> None:
    with pytest.raises(InputValidationError) as caught:
        await RPC(registry=REG).invoke(name, data)

    assert [entry["loc"] for entry in caught.value.payload] == [location]


async def test_invalid_input_remote(remote: RPC) -> None:
    with pytest.raises(InputValidationError) as caught:
        await remote.remote("sum_point", {"x": 1, "y": [1]}, timeout=5)

    error = caught.value
    assert error.status == 422
    assert "y:" in error.message
    assert error.payload == [{"loc": ["y"], "msg": "Input should be a valid integer", "type": "int_type"}]


# -- output validation and serialisation ----------------------------------------------------------------


async def test_output_mismatch_local() -> None:
    with pytest.raises(OutputValidationError) as caught:
        await RPC(registry=REG).invoke("wrong_output")

    assert caught.value.status == 500
    assert "wrong_output" in caught.value.message
    assert caught.value.payload[0]["type"] == "int_parsing"


async def test_output_mismatch_remote(remote: RPC) -> None:
    with pytest.raises(OutputValidationError) as caught:
        await remote.remote("wrong_output", timeout=5)

    assert caught.value.status == 500
    assert "does not match its return type" in caught.value.message


@pytest.mark.parametrize("name", ["opaque_any", "opaque_unhinted"])
async def test_unserialisable_output_http(remote: RPC, name: str) -> None:
    with pytest.raises(OutputValidationError, match="cannot be serialised"):
        await remote.remote(name, timeout=5)


@pytest.mark.parametrize("name", ["opaque_any", "opaque_unhinted"])
async def test_unserialisable_output_memory(name: str) -> None:
    async with testing.Mesh() as mesh:
        await mesh.add("opaque", registry=REG)
        with pytest.raises(OutputValidationError, match="cannot be serialised"):
            await mesh.caller().remote(name, timeout=5)


async def test_output_model_becomes_json(remote: RPC) -> None:
    assert await remote.remote("sum_point", {"x": 1, "y": 2}) == {"kind": "Point", "total": 3.0}
    assert await remote.remote("next_age", {"name": "Ada", "age": 1}) == {"name": "Ada", "age": 2}


async def test_none_result_remote(remote: RPC) -> None:
    assert await remote.remote("nothing") is None


async def test_model_input_sent_remote(remote: RPC) -> None:
    assert await remote.remote("box_area", Box(width=3, height=2)) == {"kind": "Box", "total": 6.0}


# -- parameters, wire and session ----------------------------------------------------------------------


async def test_trailing_parameters_omitted() -> None:
    rpc = RPC(registry=REG, services="svc")

    assert await rpc.invoke("only_services", {"ignored": True}) == "services=svc"
    assert await rpc.invoke("services_and_data", 21) == 42
    assert _definition(only_services).arity == 1
    assert _definition(services_and_data).arity == 2


async def test_trailing_parameters_remote(remote: RPC) -> None:
    assert await remote.remote("only_services") == "services=None"
    assert await remote.remote("services_and_data", 4) == 8


async def test_wire_given_locally() -> None:
    details = await RPC(registry=REG, trace_id="trace-1").invoke("wire_details")

    assert details["trace_id"] == "trace-1"
    assert len(details["call_id"]) == 32
    assert details["hop"] == 0
    assert details["has_rpc"] is True


async def test_auth_needs_session() -> None:
    with pytest.raises(MissingSessionError, match="needs a session") as caught:
        await RPC(registry=REG).invoke("whoami")

    assert caught.value.status == 401


async def test_auth_with_session() -> None:
    assert await RPC(registry=REG, session={"user": "ada"}).invoke("whoami") == {"user": "ada"}
