"""Channels to other ragmesh services: deadline on every call, retries, forwarded metadata.

One long-lived channel per upstream. Every call gets the caller's default timeout,
shortened to what is left of the incoming call's deadline, so deadlines propagate
through the mesh; cancelling the incoming call cancels the awaited upstream call.
UNAVAILABLE is retried by the channel's service config, never by hand.

Credentials: inside a call, an upstream that acts for the caller gets the caller's
`authorization`, so the caller's tenant scopes what it sees; outside any call (background
work, see `context.background`) it gets the service's own API key. An upstream that
serves the service itself (embed, for ingest) always gets the service's own key when
one is set. A call the service makes as itself (either of those last two) is marked as
the mesh's own, which the per-caller limit leaves alone while authentication is off
(interceptors.CallerLimit).
"""

import asyncio
import json
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from services.common.context import (
    SERVICE,
    authorization_var,
    principal_var,
    request_id_var,
    time_remaining,
)
from services.common.errors import DeadlineExceeded, ServiceError, Unavailable
from services.common.interceptors import MESH_CALL_KEY, REQUEST_ID_KEY
from services.common.tracing import process_tracer_provider

RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

StubT = TypeVar("StubT")
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def upstream_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo an upstream's error carries (google.rpc.Status in the trailing
    metadata), or None when it carries none."""
    for key, value in exc.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY:
            continue
        info = error_details_pb2.ErrorInfo()
        try:
            details = status_pb2.Status.FromString(value).details
            if any(detail.Unpack(info) for detail in details):
                return info
        except DecodeError:
            pass
        return None
    return None


class _Forwarding:
    """Adds the call's authorization and request id, and bounds the timeout."""

    def __init__(self, default_timeout: float, api_key: str, forward_caller: bool) -> None:
        self._default_timeout = default_timeout
        self._own_authorization = f"Bearer {api_key}" if api_key else ""
        self._forward_caller = forward_caller

    def _authorization(self) -> str:
        caller = authorization_var.get()
        if self._forward_caller and caller:
            return caller
        return self._own_authorization or caller

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        authorization = self._authorization()
        if authorization and "authorization" not in metadata:
            metadata["authorization"] = authorization
        if not self._forward_caller or principal_var.get() is SERVICE:
            metadata[MESH_CALL_KEY] = "1"
        request_id = request_id_var.get()
        if request_id and REQUEST_ID_KEY not in metadata:
            metadata[REQUEST_ID_KEY] = request_id
        timeout = details.timeout if details.timeout is not None else self._default_timeout
        remaining = time_remaining()
        if remaining is not None:
            timeout = max(min(timeout, remaining), 0.001)
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# A channel files each interceptor under the first kind it implements, so each kind of
# call needs an interceptor object of its own.
class _ForwardUnaryUnary(_Forwarding, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _ForwardUnaryStream(_Forwarding, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _ForwardStreamUnary(_Forwarding, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _ForwardStreamStream(_Forwarding, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def open_channel(
    target: str,
    *,
    default_timeout: float = 30.0,
    api_key: str = "",
    forward_caller: bool = True,
    tracer_provider: TracerProvider | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> grpc.aio.Channel:
    """A channel to target. api_key is the service's own credential; with forward_caller
    the caller's credentials are sent instead while serving a call. Calls are traced
    through tracer_provider, by default the process's (see tracing.configure_tracing)."""
    interceptors: list = [
        kind(default_timeout, api_key, forward_caller)
        for kind in (
            _ForwardUnaryUnary,
            _ForwardUnaryStream,
            _ForwardStreamUnary,
            _ForwardStreamStream,
        )
    ]
    tracer_provider = tracer_provider or process_tracer_provider()
    if tracer_provider is not None:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors.extend(aio_client_interceptors(tracer_provider=tracer_provider))
    return grpc.aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=[
            ("grpc.service_config", RETRY_SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            # An upstream that went away is tried again at least every second (gRPC's
            # default backoff grows to 2 minutes), so calls go through soon after it is
            # back; until then they fail fast with UNAVAILABLE.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )


class Upstream(Generic[StubT]):
    """A named upstream service: one channel and its stub."""

    def __init__(self, name: str, target: str, stub_class: type[StubT], **channel_kwargs) -> None:
        self.name = name
        self.target = target
        self.channel = open_channel(target, **channel_kwargs)
        self.stub: StubT = stub_class(self.channel)

    def error(self, exc: grpc.aio.AioRpcError) -> ServiceError:
        """The error to give our caller when a call to this upstream failed."""
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"{self.name} service at {self.target} did not answer in time")
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(
                f"{self.name} service at {self.target} is unavailable: {exc.details()}",
                reason="UPSTREAM_UNAVAILABLE",
                metadata={"upstream": self.name},
            )
        metadata = {"upstream": self.name, "upstream_code": code.name}
        if info := upstream_info(exc):
            # The upstream's own reason, e.g. QUEUE_FULL: busy, worth a retry later; and
            # what it said beside it (a limit, an expected wait), where no key of ours is.
            # The request id is the call's own, which our interceptor adds.
            if info.reason:
                metadata["upstream_reason"] = info.reason
            for key, value in info.metadata.items():
                if key != "request_id":
                    metadata.setdefault(key, value)
        error = ServiceError(
            f"{self.name} service failed: {exc.details()}",
            reason="UPSTREAM_ERROR",
            metadata=metadata,
        )
        error.code = code
        return error

    async def close(self) -> None:
        await self.channel.close()


async def wait_until_serving(
    target: str, patience_seconds: float, still_running: Callable[[], bool] = lambda: True
) -> None:
    """Polls target's grpc.health until it reports SERVING; raises TimeoutError after
    patience_seconds, or RuntimeError as soon as still_running() says the process is gone."""
    deadline = time.monotonic() + patience_seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not still_running():
                raise RuntimeError(f"the service at {target} exited before serving")
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the service at {target} was not SERVING after {patience_seconds:.0f} s")
