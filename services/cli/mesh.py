"""Where the mesh is and how to call it: targets, credentials, channels, and errors as one
line a person can act on."""

import collections

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ragmesh.ingest.v1 import ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2_grpc
from ragmesh.telemetry.v1 import telemetry_pb2_grpc

# The services the CLI calls, with their default ports (embed is only called by services).
PORTS = {"ingest": 50051, "llm": 50053, "sessions": 50054, "telemetry": 50055}
STUBS = {
    "ingest": ingest_pb2_grpc.IngestServiceStub,
    "llm": llm_pb2_grpc.LlmServiceStub,
    "sessions": sessions_pb2_grpc.SessionsServiceStub,
    "telemetry": telemetry_pb2_grpc.TelemetryServiceStub,
}
# Deadline of every unary call; streams (uploads, watches, answers) run as long as they last.
UNARY_TIMEOUT_SECONDS = 30.0
# As the services' MAX_MESSAGE_BYTES default: a document's text comes in parts this big.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class CliError(Exception):
    """A failure the CLI reports as one line and exit status 1."""


def parse_targets(host: str, overrides: list[str]) -> dict[str, str]:
    """Every service at host on its default port, then each SERVICE=HOST:PORT override.
    Raises ValueError naming what is wrong."""
    targets = {name: f"{host}:{port}" for name, port in PORTS.items()}
    for override in overrides:
        name, sep, target = override.partition("=")
        if not sep or name not in PORTS:
            raise ValueError(
                f"{override!r} is not SERVICE=HOST:PORT with SERVICE one of {', '.join(PORTS)}"
            )
        address, colon, port = target.rpartition(":")
        if not colon or not address or not port.isdigit():
            raise ValueError(f"{target!r} is not HOST:PORT")
        targets[name] = target
    return targets


_CALL_DETAILS = ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")


class _Details(collections.namedtuple("_Details", _CALL_DETAILS), grpc.ClientCallDetails):
    pass


class _Credentials(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Sends the API key on every call and bounds unary calls by UNARY_TIMEOUT_SECONDS."""

    def __init__(self, api_key: str) -> None:
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _details(self, details, timeout: float | None) -> _Details:
        return _Details(
            details.method,
            details.timeout if details.timeout is not None else timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details, UNARY_TIMEOUT_SECONDS), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details, None), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details, None), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details, None), request_iterator)


class Mesh:
    """The targets and credentials of one CLI run. A command calls one service: `stub`
    opens it and remembers it, so a failed call is explained with its name and target."""

    def __init__(self) -> None:
        self.targets = {name: f"localhost:{port}" for name, port in PORTS.items()}
        self.api_key = ""
        self.json = False
        self.service = ""
        self._channels: list[grpc.Channel] = []

    def stub(self, service: str):
        self.service = service
        channel = grpc.intercept_channel(
            grpc.insecure_channel(
                self.targets[service],
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ],
            ),
            _Credentials(self.api_key),
        )
        self._channels.append(channel)
        return STUBS[service](channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def explain(self, error: grpc.RpcError) -> str:
        """One line for a failed call: what went wrong, with the server's own message."""
        where = f"the {self.service} service at {self.targets[self.service]}"
        code, details = error.code(), error.details() or ""
        status = rpc_status.from_call(error)
        if code == grpc.StatusCode.UNAVAILABLE and status is None:
            # No status from a ragmesh server: nothing answered at that address.
            return f"{where} is not reachable"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and status is None:
            return f"{where} did not answer within {UNARY_TIMEOUT_SECONDS:.0f} s"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return (
                f"{where} refused the credentials ({details}); "
                "pass --api-key or set RAGMESH_API_KEY"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return f"{where} refused: {details}"
        if code == grpc.StatusCode.UNIMPLEMENTED and status is None:
            return f"{where} does not offer this call; is it the {self.service} service?"
        return (details or code.name) + _violations(status, details)


def _violations(status, details: str) -> str:
    """BadRequest field violations the message does not already say."""
    if status is None:
        return ""
    extra = []
    for packed in status.details:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            extra += [
                f"{v.field}: {v.description}"
                for v in bad_request.field_violations
                if v.description not in details
            ]
    return f" ({'; '.join(extra)})" if extra else ""
