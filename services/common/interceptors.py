"""The server interceptor every service runs: request id, auth, logging, error mapping,
and each call's status and latency in the server's metrics.

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
    authorization_var,
    deadline_var,
    principal_var,
    request_id_var,
)
from services.common.decoding import reject_undecodable
from services.common.errors import ServiceError, Unimplemented
from services.common.metrics import SERVICE_NAME as METRICS_SERVICE
from services.common.metrics import ServerMetrics

_LOGGER = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Health, reflection and metrics stay open so probes, grpcurl and the telemetry service
# work without credentials; their calls are not counted in the metrics.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", f"/{METRICS_SERVICE}/")


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, metrics: ServerMetrics | None = None) -> None:
        self._authenticator = authenticator
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = reject_undecodable(await continuation(handler_call_details), method)
        if handler is None:
            return None
        is_open = method.startswith(_OPEN_PREFIXES)
        enforce_auth = self._authenticator.enabled and not is_open
        metrics = None if is_open else self._metrics
        metadata = handler_call_details.invocation_metadata or ()
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, metadata, enforce_auth, metrics),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, metadata, enforce_auth, metrics),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, metadata, enforce_auth, metrics),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(handler.unary_unary, method, metadata, enforce_auth, metrics),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _enter(self, context, metadata, enforce_auth) -> None:
        """Sets the call's context variables; raises ServiceError on bad credentials."""
        request_id = ""
        authorization = ""
        for key, value in metadata:
            if key == REQUEST_ID_KEY:
                request_id = value
            elif key == "authorization":
                authorization = value
        request_id = request_id[:128] or uuid.uuid4().hex
        request_id_var.set(request_id)
        authorization_var.set(authorization)
        remaining = context.time_remaining()
        deadline_var.set(None if remaining is None else time.monotonic() + remaining)
        if enforce_auth:
            principal_var.set(self._authenticator.authenticate(authorization))

    def _wrap_unary(self, behavior, method, metadata, enforce_auth, metrics):
        async def wrapper(request, context):
            started = time.perf_counter()
            # A call that ends any other way was cancelled by its client.
            code = grpc.StatusCode.CANCELLED
            try:
                self._enter(context, metadata, enforce_auth)
                response = await behavior(request, context)
                code = grpc.StatusCode.OK
            except Exception as exc:
                code = _status_code(exc, context)
                await _abort(context, exc, method, started)
            finally:
                if metrics is not None:
                    metrics.record_call(method, code, time.perf_counter() - started)
            _log_done(method, started)
            return response

        return wrapper

    def _wrap_stream(self, behavior, method, metadata, enforce_auth, metrics):
        async def wrapper(request, context):
            started = time.perf_counter()
            code = grpc.StatusCode.CANCELLED
            try:
                self._enter(context, metadata, enforce_auth)
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
