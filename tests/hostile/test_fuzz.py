"""Every RPC of every service, fed hostile input generated from its request descriptor:
random and extreme field values, oversize strings and lists, unknown enum numbers,
replayed and forged page tokens, other tenants' ids, and random bytes as the whole
message (client streams too). Each answer must be a status the service chose, with a
message (never INTERNAL or UNKNOWN, never a hang past the deadline), and every service
must still be alive after each example.

RAGMESH_FUZZ_EXAMPLES sets the examples per RPC (default 25); runs are deterministic."""

import os

import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hostile_support import (
    CALL_SECONDS,
    FUZZ,
    FUZZ_LOG,
    INFRASTRUCTURE,
    Pools,
    message_class,
    method_path,
    ragmesh_methods,
    raw_call,
    request_strategy,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("RAGMESH_FUZZ_EXAMPLES", "25"))
METHODS = ragmesh_methods()


def _field_names(descriptor, seen: set) -> set[str]:
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    names = set()
    for field in descriptor.fields:
        names.add(field.name)
        if field.message_type is not None:
            names |= _field_names(field.message_type, seen)
    return names


def _harvest_page_tokens(mesh, mounted, fuzzer) -> list[str]:
    """A second-page token from every listing of the fuzzing caller's own data."""
    own = {"document_id": fuzzer.documents[0], "session_id": fuzzer.sessions[0]}
    tokens = []
    for method in METHODS:
        fields = method.input_type.fields_by_name
        if "page_token" not in fields or "next_page_token" not in method.output_type.fields_by_name:
            continue
        values = {"page_size": 1} | {name: own[name] for name in fields if name in own}
        request = message_class(method.input_type)(**values)
        stub = mesh.channels[mounted[method.containing_service.full_name][0]].unary_unary(
            method_path(method), response_deserializer=message_class(method.output_type).FromString
        )
        reply = stub(request.SerializeToString(), metadata=FUZZ, timeout=CALL_SECONDS)
        if reply.next_page_token:
            tokens.append(reply.next_page_token)
    return tokens


@pytest.fixture(scope="module")
def mounted(mesh) -> dict[str, list[str]]:
    """Service full name -> the services (mesh names) whose servers mount it."""
    found: dict[str, list[str]] = {}
    for name, channel in mesh.channels.items():
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for reply in stub.ServerReflectionInfo(iter([request]), timeout=CALL_SECONDS):
            for service in reply.list_services_response.service:
                found.setdefault(service.name, []).append(name)
    return found


@pytest.fixture(scope="module")
def pools(mesh, mounted, alpha, fuzzer) -> Pools:
    names = set()
    for method in METHODS:
        names |= _field_names(method.input_type, set())
    return Pools(
        ids=[*alpha.ids(), *fuzzer.ids()],
        page_tokens=_harvest_page_tokens(mesh, mounted, fuzzer),
        names=sorted(names),
        own={"document_id": fuzzer.documents[0], "session_id": fuzzer.sessions[0]},
    )


def _served_methods(mesh, mounted) -> set[str]:
    """Every method the running servers expose, read back through server reflection."""
    served = set()
    for service, servers in mounted.items():
        if service.startswith(INFRASTRUCTURE):
            continue
        stub = reflection_pb2_grpc.ServerReflectionStub(mesh.channels[servers[0]])
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
        for reply in stub.ServerReflectionInfo(iter([request]), timeout=CALL_SECONDS):
            for raw in reply.file_descriptor_response.file_descriptor_proto:
                file = descriptor_pb2.FileDescriptorProto.FromString(raw)
                for declared in file.service:
                    if f"{file.package}.{declared.name}" == service:
                        served |= {f"/{service}/{m.name}" for m in declared.method}
    return served


def test_every_served_rpc_is_fuzzed(mesh, mounted):
    """The fuzzed methods come from the generated descriptors; they must be exactly what
    the servers serve, so a new RPC is fuzzed without editing this test."""
    assert {method_path(m) for m in METHODS} == _served_methods(mesh, mounted)


@pytest.mark.parametrize("method", METHODS, ids=method_path)
def test_hostile_input_gets_a_defined_status(mesh, mounted, pools, method):
    path = method_path(method)
    servers = mounted.get(method.containing_service.full_name)
    assert servers, f"no server mounts {method.containing_service.full_name}"

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(server=st.sampled_from(servers), payload=request_strategy(method, pools))
    def example(server, payload):
        outcome = raw_call(mesh.channels[server], method, payload, FUZZ, CALL_SECONDS)
        FUZZ_LOG.record(path, "stream stopped" if outcome.cancelled_by_us else outcome.code.name)
        assert outcome.defined, (
            f"{path} on {server} answered {outcome.code.name}: {outcome.details!r}"
        )
        alive = mesh.alive()
        assert all(state == "SERVING" for state in alive.values()), alive
        if "llm" in servers:
            mesh.settle_llm()

    example()
