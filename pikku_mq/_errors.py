"""The pikku_mq exception tree and its wire form.

Every error that pikku_mq raises derives from :class:`PikkuMQError`::

    PikkuMQError
    ├── ConfigurationError (also ValueError)     a setting is missing or invalid; raised locally
    │   └── DeploymentConflictError              a live instance already has this deployment id
    ├── BadRequestError                    400   the request is malformed
    │   ├── MethodNotAllowedError          405   the HTTP method is not POST
    │   ├── RequestTimeoutError            408   the client did not send the whole body in time
    │   └── UnsupportedMediaTypeError      415   the body's content type is not JSON or msgpack
    ├── UnauthorizedError                  401   no valid credentials
    │   └── MissingSessionError            401   the function needs a session and none arrived
    ├── ForbiddenError                     403
    ├── NotFoundError                      404
    │   └── FunctionNotFoundError          404   no such function, or it is not exposed
    ├── PayloadTooLargeError               413   the request body is over the worker's limit
    ├── UnprocessableContentError          422
    │   └── InputValidationError           422   `data` does not match the input type
    ├── InternalServerError                500   the function raised an unexpected exception
    │   └── OutputValidationError          500   the result does not match the output type
    ├── ServiceUnavailableError            503   the worker is draining (retryable)
    │   ├── BusyError                      503   the worker has its maximum of calls in flight (retryable)
    │   └── CallInterruptedError           503   the worker stopped while the function ran
    ├── DeadlineExceededError (also TimeoutError)  504   the call's deadline passed
    ├── LoopDetectedError                  508   the hop limit was reached
    ├── RoutingError                       503   no live instance could take the call
    ├── DiscoveryError                     503   the discovery store failed (unreachable, broken schema)
    ├── TransportError                     502   the call failed on the way; it may have run
    │   └── EndpointUnreachableError       502   the connection was refused; the call did not run
    ├── ProtocolError                      502   the peer's reply is not a pikku_mq reply
    └── RemoteError                        any   a remote error whose name is not registered here

An error crosses the wire as data, never pickled: the envelope
``{"name", "message", "payload", "errorId", "code", "retryable"}`` with the HTTP status beside it. Every
subclass of :class:`PikkuMQError`, user-defined ones included, is registered under its class name when
it is defined, so the caller re-raises the same class when the module that defines it is imported on
both sides. A name that is not registered comes back as :class:`RemoteError`, which keeps the name,
message, payload and status.
"""

from __future__ import annotations

import math
import uuid
import warnings
from typing import Any, ClassVar

import pydantic_core

__all__ = [
    "BadRequestError",
    "BusyError",
    "CallInterruptedError",
    "ConfigurationError",
    "DeadlineExceededError",
    "DeploymentConflictError",
    "DiscoveryError",
    "EndpointUnreachableError",
    "ForbiddenError",
    "FunctionNotFoundError",
    "InputValidationError",
    "InternalServerError",
    "LoopDetectedError",
    "MethodNotAllowedError",
    "MissingSessionError",
    "NotFoundError",
    "OutputValidationError",
    "PayloadTooLargeError",
    "PikkuMQError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeoutError",
    "RoutingError",
    "ServiceUnavailableError",
    "TransportError",
    "UnauthorizedError",
    "UnprocessableContentError",
    "UnsupportedMediaTypeError",
    "error_from_envelope",
    "function_not_found",
    "registered_error",
]

_REGISTRY: dict[str, type[PikkuMQError]] = {}

_MAX_NAME_SHOWN = 200
"""Characters of a function name echoed in a not-found error; the rest is cut."""


class PikkuMQError(Exception):
    """Root of every pikku_mq error.

    ``status`` is the HTTP status the error travels with, ``code`` a stable snake_case identifier for
    scripts, ``retryable`` whether another attempt may succeed, and ``payload`` any JSON value that
    gives details (for a validation error, the offending fields).
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", *, payload: Any = None, error_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.payload = payload
        self.error_id = error_id or uuid.uuid4().hex

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        existing = _REGISTRY.get(cls.__name__)
        if existing is not None and _origin(existing) != _origin(cls):
            # Errors are matched by class name on the wire, so the later class wins in this process.
            warnings.warn(
                f"error class {_origin(cls)} replaces {_origin(existing)} for the wire name "
                f"'{cls.__name__}'; callers will re-raise the later one. Give one of them another name.",
                RuntimeWarning,
                stacklevel=2,
            )
        _REGISTRY[cls.__name__] = cls

    def __str__(self) -> str:
        return self.message

    @property
    def wire_name(self) -> str:
        """Name sent on the wire: the class name, or the original name for a :class:`RemoteError`."""
        return type(self).__name__

    @property
    def http_status(self) -> int:
        """HTTP status sent with the error: the class's, or the original one for a :class:`RemoteError`."""
        return self.status

    def to_envelope(self) -> dict[str, Any]:
        """Return the JSON error body sent to the caller."""
        return {
            "name": self.wire_name,
            "message": self.message,
            "payload": _jsonable(self.payload),
            "errorId": self.error_id,
            "code": self.code,
            "retryable": self.retryable,
        }


_REGISTRY[PikkuMQError.__name__] = PikkuMQError


class ConfigurationError(PikkuMQError, ValueError):
    code = "configuration"


class DeploymentConflictError(ConfigurationError):
    code = "deployment_conflict"


class BadRequestError(PikkuMQError):
    status = 400
    code = "bad_request"


class MethodNotAllowedError(BadRequestError):
    status = 405
    code = "method_not_allowed"


class RequestTimeoutError(BadRequestError):
    status = 408
    code = "request_timeout"


class UnsupportedMediaTypeError(BadRequestError):
    status = 415
    code = "unsupported_media_type"


class UnauthorizedError(PikkuMQError):
    status = 401
    code = "unauthorized"


class MissingSessionError(UnauthorizedError):
    code = "missing_session"


class ForbiddenError(PikkuMQError):
    status = 403
    code = "forbidden"


class NotFoundError(PikkuMQError):
    status = 404
    code = "not_found"


class FunctionNotFoundError(NotFoundError):
    code = "function_not_found"


class PayloadTooLargeError(PikkuMQError):
    status = 413
    code = "payload_too_large"


class UnprocessableContentError(PikkuMQError):
    status = 422
    code = "unprocessable"


class InputValidationError(UnprocessableContentError):
    code = "invalid_input"


class InternalServerError(PikkuMQError):
    status = 500
    code = "internal"


class OutputValidationError(InternalServerError):
    code = "invalid_output"


class ServiceUnavailableError(PikkuMQError):
    status = 503
    code = "unavailable"
    retryable = True


class BusyError(ServiceUnavailableError):
    """The worker already has its maximum of calls in flight, so it declined this one before running it."""

    code = "busy"


class CallInterruptedError(ServiceUnavailableError):
    """The worker stopped while the function ran, so it may have partly run: not retryable as such."""

    code = "interrupted"
    retryable = False


class DeadlineExceededError(PikkuMQError, TimeoutError):
    status = 504
    code = "deadline_exceeded"


class LoopDetectedError(PikkuMQError):
    status = 508
    code = "loop_detected"


class RoutingError(PikkuMQError):
    status = 503
    code = "no_instance"
    retryable = True


class DiscoveryError(PikkuMQError):
    status = 503
    code = "discovery"
    retryable = True


class TransportError(PikkuMQError):
    """The call failed between caller and worker; the function may or may not have run."""

    status = 502
    code = "transport"


class EndpointUnreachableError(TransportError):
    """The endpoint refused the connection, so the function certainly did not run."""

    code = "unreachable"
    retryable = True


class ProtocolError(PikkuMQError):
    status = 502
    code = "protocol"


class RemoteError(PikkuMQError):
    """A remote error whose name is not registered in this process.

    ``name`` and ``remote_status`` keep what the peer sent, so nothing of the original is lost.
    """

    def __init__(
        self,
        name: str,
        message: str,
        *,
        remote_status: int = 500,
        payload: Any = None,
        error_id: str | None = None,
        remote_code: str | None = None,
        remote_retryable: bool = False,
    ) -> None:
        super().__init__(message, payload=payload, error_id=error_id)
        self.name = name
        self.remote_status = remote_status
        self.remote_code = remote_code
        self.remote_retryable = remote_retryable

    @property
    def wire_name(self) -> str:
        return self.name

    @property
    def http_status(self) -> int:
        return self.remote_status

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"

    def to_envelope(self) -> dict[str, Any]:
        envelope = super().to_envelope()
        envelope["code"] = self.remote_code or "remote"
        envelope["retryable"] = self.remote_retryable
        return envelope


def _jsonable(payload: Any) -> Any:
    """Convert an error payload to JSON-compatible values, so an error carrying a datetime still crosses the wire.

    A value that pydantic cannot convert becomes its ``str``, and a payload that cannot be converted at
    all (a reference cycle) becomes its ``repr``.
    """
    try:
        return pydantic_core.to_jsonable_python(payload, fallback=str)
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError):
        return repr(payload)


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def function_not_found(name: str) -> FunctionNotFoundError:
    """Return the not-found error for ``name``.

    The message is the same for a missing and a hidden function, so a caller cannot tell them apart.
    """
    shown_name = name if len(name) <= _MAX_NAME_SHOWN else name[:_MAX_NAME_SHOWN] + "..."
    return FunctionNotFoundError(
        f"function '{shown_name}' was not found or is not exposed", payload={"function": shown_name}
    )


def registered_error(name: str) -> type[PikkuMQError] | None:
    """Return the error class registered under ``name``, or None."""
    return _REGISTRY.get(name)


def error_from_envelope(status: int, body: Any) -> PikkuMQError:
    """Rebuild the error a peer sent as ``body`` with HTTP ``status``.

    A body that is not an error envelope becomes a :class:`ProtocolError`; an unregistered name
    becomes a :class:`RemoteError`.
    """
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return ProtocolError(f"peer returned status {status} without an error envelope: {body!r:.200}")

    name: str = body["name"]
    message = body.get("message")
    message = message if isinstance(message, str) else ""
    error_id = body.get("errorId") if isinstance(body.get("errorId"), str) else None
    payload = body.get("payload")

    cls = _REGISTRY.get(name)
    if cls is None or cls is RemoteError:
        code = body.get("code")
        return RemoteError(
            name,
            message,
            remote_status=status,
            payload=payload,
            error_id=error_id,
            remote_code=code if isinstance(code, str) else None,
            remote_retryable=body.get("retryable") is True,
        )

    # Build the instance without calling a user-defined __init__, whose signature is unknown here.
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.message = message
    error.payload = payload
    error.error_id = error_id or uuid.uuid4().hex
    return error


def check_seconds(value: object, name: str) -> float:
    """Return ``value`` as seconds, or raise :class:`ConfigurationError` unless it is a positive, finite number.

    A bool is refused although Python counts it as an int: ``timeout=True`` is a mistake, not one second.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigurationError(f"{name} must be a positive, finite number of seconds, got {value!r:.80}")
    return float(value)


def check_flag(value: object, name: str) -> bool | None:
    """Return ``value`` if it is True, False or None, else raise :class:`ConfigurationError`.

    A string such as ``"false"`` read from a configuration file would otherwise count as true.
    """
    if value is not None and not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True, False or None, got {value!r:.80}")
    return value
