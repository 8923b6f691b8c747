"""Inputs the fuzzer found answered INTERNAL or UNKNOWN, kept as they were found: each now
gets INVALID_ARGUMENT naming what is wrong."""

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hostile_support import CALL_SECONDS, FUZZ, method_path, ragmesh_methods, raw_call

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2
from ragmesh.telemetry.v1 import telemetry_pb2

METHODS = {method_path(m): m for m in ragmesh_methods()}


def _details(channel, method, payload) -> tuple[grpc.StatusCode, str, list]:
    """The call's code, message and google.rpc.Status details, unpacked."""
    path = method_path(method)
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(payload), metadata=FUZZ, timeout=CALL_SECONDS)
        elif method.server_streaming:
            next(channel.unary_stream(path)(payload, metadata=FUZZ, timeout=CALL_SECONDS))
        else:
            channel.unary_unary(path)(payload, metadata=FUZZ, timeout=CALL_SECONDS)
    except grpc.RpcError as exc:
        status = rpc_status.from_call(exc)
        unpacked = []
        for detail in status.details if status else []:
            for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
                if detail.Is(kind.DESCRIPTOR):
                    message = kind()
                    detail.Unpack(message)
                    unpacked.append(message)
        return exc.code(), exc.details(), unpacked
    raise AssertionError(f"{path} accepted {payload!r}")


def _violations(details) -> list[str]:
    """The fields named by the BadRequest detail."""
    return [
        violation.field
        for detail in details
        if isinstance(detail, error_details_pb2.BadRequest)
        for violation in detail.field_violations
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/ragmesh.embed.v1.EmbedService/Embed",
        "/ragmesh.ingest.v1.IngestService/GetDocument",
        "/ragmesh.llm.v1.LlmService/Generate",
        "/ragmesh.sessions.v1.SessionsService/SendMessage",
        "/ragmesh.telemetry.v1.TelemetryService/WatchSystemStatus",
    ],
)
def test_bytes_that_are_no_message_are_an_invalid_argument(mesh, path):
    """grpcio answered UNKNOWN ("Unexpected DecodeError") before any servicer ran."""
    method = METHODS[path]
    outcome = raw_call(mesh.channels[path.split(".")[1]], method, b"\xff", FUZZ, CALL_SECONDS)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "not a valid message" in outcome.details


def test_a_client_stream_with_a_corrupt_message_is_an_invalid_argument(mesh):
    """The ingest servicer's upload failed with INTERNAL on the undecodable second
    message; nothing is stored."""
    method = METHODS["/ragmesh.ingest.v1.IngestService/UploadDocument"]
    first = ingest_pb2.UploadDocumentRequest(
        metadata=ingest_pb2.DocumentMetadata(filename="corrupt.txt")
    ).SerializeToString()
    code, message, details = _details(mesh.channels["ingest"], method, [first, b"\x12\xff"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    reasons = [d.reason for d in details if isinstance(d, error_details_pb2.ErrorInfo)]
    assert reasons == ["MALFORMED_REQUEST"]
    listed = ingest_pb2_grpc.IngestServiceStub(mesh.channels["ingest"]).ListDocuments(
        ingest_pb2.ListDocumentsRequest(page_size=500), metadata=FUZZ, timeout=CALL_SECONDS
    )
    assert "corrupt.txt" not in [d.filename for d in listed.documents]


def test_an_invalid_timestamp_in_a_session_listing_is_an_invalid_argument(mesh):
    """last_exchange_after with nanos of -1 (the varint of 2**64 - 1): ListSessions
    answered INTERNAL."""
    method = METHODS["/ragmesh.sessions.v1.SessionsService/ListSessions"]
    found = b"*\x0b\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    code, message, details = _details(mesh.channels["sessions"], method, found)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert _violations(details) == ["last_exchange_after"]


@pytest.mark.parametrize("model", ["0" * 4097, "k" * 300, "tiny\x00model"])
def test_a_model_name_no_filesystem_takes_is_an_invalid_argument(mesh, model):
    """LoadModel answered INTERNAL (OSError: File name too long) for 4,097 zeros."""
    method = METHODS["/ragmesh.llm.v1.LlmService/LoadModel"]
    request = llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(model=model))
    code, message, details = _details(mesh.channels["llm"], method, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert _violations(details) == ["options.model"]


@pytest.mark.parametrize(
    "payload",
    [
        b"\n\x0b\x08\xff\xa2\xc9\xf5\xb6\xad\xec\xff\xff\x01",
        telemetry_pb2.WatchSystemStatusRequest(
            interval=duration_pb2.Duration(seconds=10**12)
        ).SerializeToString(),
    ],
    ids=["found", "past-duration-range"],
)
def test_an_interval_no_timedelta_holds_is_an_invalid_argument(mesh, payload):
    """An interval of -86,399,999,913,601 s: WatchSystemStatus answered INTERNAL
    (OverflowError converting it to a timedelta)."""
    method = METHODS["/ragmesh.telemetry.v1.TelemetryService/WatchSystemStatus"]
    code, message, details = _details(mesh.channels["telemetry"], method, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert _violations(details) == ["interval"]
