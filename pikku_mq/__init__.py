"""pikku_mq: remote function calls between the instances of a distributed application.

Instances register in a discovery store and keep themselves alive with heartbeats;
``await rpc.remote("greet", data)`` finds an instance hosting ``greet`` and calls it. It is the Python
counterpart of the remote RPC of the TypeScript framework Pikku, wire-compatible with it over HTTP.
"""

from ._durable import DeliveryPolicy
from ._errors import (
    BadRequestError,
    BusyError,
    CallInterruptedError,
    ConfigurationError,
    DeadlineExceededError,
    DeploymentConflictError,
    DiscoveryError,
    EndpointUnreachableError,
    ForbiddenError,
    FunctionNotFoundError,
    InputValidationError,
    InternalServerError,
    LoopDetectedError,
    MethodNotAllowedError,
    MissingSessionError,
    NotFoundError,
    OutputValidationError,
    PayloadTooLargeError,
    PikkuMQError,
    ProtocolError,
    RemoteError,
    RequestTimeoutError,
    RoutingError,
    ServiceUnavailableError,
    TransportError,
    UnauthorizedError,
    UnprocessableContentError,
    UnsupportedMediaTypeError,
)
from ._events import EventBus, event_bus_from_url
from ._functions import FunctionDefinition, FunctionRegistry, default_registry, pikku_func, pikku_sessionless_func
from ._metrics import PikkuMetrics
from ._outliers import EjectionPolicy
from ._routing import RetryPolicy
from ._rpc import RPC, Wire
from ._security import RemoteSecurity
from ._types import DeploymentConfig, DeploymentInfo, DeploymentRecord
from ._watch import DeploymentWatch, MeshEvent, MeshEventKind
from ._worker import PikkuWorker
from .backends import DeploymentService, MemoryDeploymentService, MemoryRegistry, deployment_service_from_url
from .backends.postgres import PgDeploymentService
from .backends.redis import RedisDeploymentService
from .backends.sqlalchemy import SqlAlchemyDeploymentService
from .backends.sqlite import SqliteDeploymentService
from .transports import (
    AiohttpTransport,
    ClientTransport,
    HttpxTransport,
    MemoryTransport,
    PikkuASGIApp,
    Reply,
    TransportSet,
)

__version__ = "0.1.0"

__all__ = [
    "AiohttpTransport",
    "BadRequestError",
    "BusyError",
    "CallInterruptedError",
    "ClientTransport",
    "ConfigurationError",
    "DeadlineExceededError",
    "DeliveryPolicy",
    "DeploymentConfig",
    "DeploymentConflictError",
    "DeploymentInfo",
    "DeploymentRecord",
    "DeploymentService",
    "DeploymentWatch",
    "DiscoveryError",
    "EjectionPolicy",
    "EndpointUnreachableError",
    "EventBus",
    "ForbiddenError",
    "FunctionDefinition",
    "FunctionNotFoundError",
    "FunctionRegistry",
    "HttpxTransport",
    "InputValidationError",
    "InternalServerError",
    "LoopDetectedError",
    "MemoryDeploymentService",
    "MemoryRegistry",
    "MemoryTransport",
    "MeshEvent",
    "MeshEventKind",
    "MethodNotAllowedError",
    "MissingSessionError",
    "NotFoundError",
    "OutputValidationError",
    "PayloadTooLargeError",
    "PgDeploymentService",
    "PikkuASGIApp",
    "PikkuMQError",
    "PikkuMetrics",
    "PikkuWorker",
    "ProtocolError",
    "RPC",
    "RedisDeploymentService",
    "RemoteError",
    "RemoteSecurity",
    "Reply",
    "RequestTimeoutError",
    "RetryPolicy",
    "RoutingError",
    "ServiceUnavailableError",
    "SqlAlchemyDeploymentService",
    "SqliteDeploymentService",
    "TransportError",
    "TransportSet",
    "UnauthorizedError",
    "UnprocessableContentError",
    "UnsupportedMediaTypeError",
    "Wire",
    "__version__",
    "default_registry",
    "deployment_service_from_url",
    "event_bus_from_url",
    "pikku_func",
    "pikku_sessionless_func",
]
