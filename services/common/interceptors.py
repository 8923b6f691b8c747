"""The server interceptor every service runs: request id, auth, the per-caller limit on
calls in flight, logging, error mapping, and each call's status and latency in the
server's metrics.

It wraps unary and streaming handlers alike. Domain errors (`ServiceError`) become their
status code with `google.rpc.Status` details, and so does a database that cannot be
reached (UNAVAILABLE); anything else becomes INTERNAL with the request id and no
internals, and is logged with its traceback.
"""

import inspect
import logging
import sys
import time
import uuid

import grpc
from grpc_status import rpc_status

from services.common.auth import Authenticator
from services.common.context import (
    Principal,
    authorization_var,
    deadline_var,
    principal_var,
    request_id_var,
)
from services.common.decoding import reject_undecodable
from services.common.errors import ResourceExhausted, ServiceError, Unimplemented
from services.common.metrics import SERVICE_NAME as METRICS_SERVICE
from services.common.metrics import ServerMetrics

_LOGGER = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Sent by a ragmesh service on a call it makes as itself (services.common.clients), not
# for a caller; heeded only while authentication is off (see CallerLimit).
MESH_CALL_KEY = "x-ragmesh-mesh-call"
# The scope of a ragmesh service's own API key on the services it calls (see CallerLimit).
SERVICE_SCOPE = "service"
# Health, reflection and metrics stay open so probes, grpcurl and the telemetry service
# work without credentials; their calls are not counted in the metrics.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", f"/{METRICS_SERVICE}/")


class CallerLimit:
    """At most `limit` calls in flight per caller (subject and tenant) on this server; 0
    is no limit. A streaming call counts until it ends, however it ends.

    Not limited: the mesh's own calls, bounded by the limited calls of their callers and
    by the services' workers. With authentication on they come with a key holding the
    scope "service"; with it off (loopback, everyone anonymous) they are told apart by
    MESH_CALL_KEY, which gives an anonymous caller nothing it does not already have.
    Calls a service makes for its caller (sessions to ingest and llm) carry the caller's
    credentials and count as that caller's on the upstream: a caller can use up only its
    own room there.

    The server's handlers all run on one event loop, so counting needs no lock.
    """

    def __init__(self, limit: int, setting: str) -> None:
        self._limit = limit
        self._setting = setting
        self._in_flight: dict[tuple[str, str], int] = {}

    def acquire(self, principal: Principal, mesh_call: bool) -> tuple[str, str] | None:
        """Takes a place for the call (the key to release), or None when it is not limited;
        raises ResourceExhausted when the caller has no place left."""
        if not self._limit or mesh_call or SERVICE_SCOPE in principal.scopes:
            return None
        key = (principal.subject, principal.tenant)
        held = self._in_flight.get(key, 0)
        if held >= self._limit:
            raise ResourceExhausted(
                f"{principal.subject!r} (tenant {principal.tenant!r}) already has {held} calls "
                f"in flight on this server, its limit ({self._setting}={self._limit}); wait "
                "for one to end (streams count while open)",
                reason="CALLER_CALL_LIMIT",
                metadata={"setting": self._setting, "limit": str(self._limit)},
            )
        self._in_flight[key] = held + 1
        return key

    def release(self, key: tuple[str, str] | None) -> None:
        if key is None:
            return
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
        else:
            del self._in_flight[key]


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        metrics: ServerMetrics | None = None,
        caller_limit: CallerLimit | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._metrics = metrics
        self._caller_limit = caller_limit or CallerLimit(0, "")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = reject_undecodable(await continuation(handler_call_details), method)
        if handler is None:
            return None
        is_open = method.startswith(_OPEN_PREFIXES)
        enforce_auth = self._authenticator.enabled and not is_open
        metrics = None if is_open else self._metrics
        metadata = handler_call_details.invocation_metadata or ()
        call = (method, metadata, enforce_auth, metrics, not is_open)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, *call),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, *call),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, *call),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(handler.unary_unary, *call),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _enter(self, context, metadata, enforce_auth, limited) -> tuple[str, str] | None:
        """Sets the call's context variables and takes the caller's place for the call (the
        key to release); raises ServiceError on bad credentials or no place left."""
        request_id = ""
        authorization = ""
        mesh_call = False
        for key, value in metadata:
            if key == REQUEST_ID_KEY:
                request_id = value
            elif key == "authorization":
                authorization = value
            elif key == MESH_CALL_KEY:
                mesh_call = not self._authenticator.enabled
        request_id = request_id[:128] or uuid.uuid4().hex
        request_id_var.set(request_id)
        authorization_var.set(authorization)
        remaining = context.time_remaining()
        deadline_var.set(None if remaining is None else time.monotonic() + remaining)
        if enforce_auth:
            principal_var.set(self._authenticator.authenticate(authorization))
        if not limited:
            return None
        return self._caller_limit.acquire(principal_var.get(), mesh_call)

    def _wrap_unary(self, behavior, method, metadata, enforce_auth, metrics, limited):
        async def wrapper(request, context):
            started = time.perf_counter()
            # A call that ends any other way was cancelled by its client.
            code = grpc.StatusCode.CANCELLED
            place = None
            try:
                place = self._enter(context, metadata, enforce_auth, limited)
                response = await behavior(request, context)
                code = grpc.StatusCode.OK
            except Exception as exc:
                code = _status_code(exc, context)
                await _abort(context, exc, method, started)
            finally:
                self._caller_limit.release(place)
                if metrics is not None:
                    metrics.record_call(method, code, time.perf_counter() - started)
            _log_done(method, started)
            return response

        return wrapper

    def _wrap_stream(self, behavior, method, metadata, enforce_auth, metrics, limited):
        async def wrapper(request, context):
            started = time.perf_counter()
            code = grpc.StatusCode.CANCELLED
            place = None
            try:
                place = self._enter(context, metadata, enforce_auth, limited)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result
                code = grpc.StatusCode.OK
            except Exception as exc:
                code = _status_code(exc, context)
                await _abort(context, exc, method, started)
            finally:
                self._caller_limit.release(place)
                if metrics is not None:
                    metrics.record_call(method, code, time.perf_counter() - started)
            _log_done(method, started)

        return wrapper


def _log_done(method: str, started: float) -> None:
    if _LOGGER.isEnabledFor(logging.DEBUG):
        _LOGGER.debug(
            "%s OK in %.1f ms",
            method,
            (time.perf_counter() - started) * 1000,
            extra={"method": method},
        )


def _status_code(exc: Exception, context) -> grpc.StatusCode:
    """The status the call ends with because of exc (see _abort)."""
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(exc, ServiceError):
        return exc.code
    if _unreachable_database(exc) is not None:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _unreachable_database(exc: Exception) -> ServiceError | None:
    """UNAVAILABLE for a database that cannot be reached (services.common.database);
    a service that never loaded that module has no database to fail."""
    database = sys.modules.get("services.common.database")
    return None if database is None else database.unreachable(exc)


async def _abort(context, exc: Exception, method: str, started: float) -> None:
    """Ends the call with the status for exc. Always raises."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    request_id = request_id_var.get()
    elapsed_ms = (time.perf_counter() - started) * 1000
    if isinstance(exc, NotImplementedError):
        # What the generated base servicer raises for an RPC a service does not offer yet.
        exc = Unimplemented(f"{method} is not implemented by this server")
    # A database that cannot be reached is the caller's to retry, not an internal error.
    exc = _unreachable_database(exc) or exc
    if isinstance(exc, ServiceError):
        error = exc
        _LOGGER.info(
            "%s failed %s (%s): %s",
            method,
            error.code.name,
            error.reason,
            error.message,
            extra={"method": method, "code": error.code.name, "elapsed_ms": elapsed_ms},
        )
    else:
        _LOGGER.exception(
            "%s failed with an unexpected error",
            method,
            extra={"method": method, "elapsed_ms": elapsed_ms},
        )
        error = ServiceError(f"internal error; quote request id {request_id} to the operator")
    error.metadata.setdefault("request_id", request_id)
    status = rpc_status.to_status(error.to_status())
    await context.abort(
        status.code,
        status.details,
        trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_KEY, request_id)),
    )
