"""What the hostile-caller tests share: every RPC found in the generated descriptors,
Hypothesis strategies built from message descriptors, and a raw call that sends bytes
and reports the status it ends with."""

import base64
import importlib
import json
import pkgutil
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from hypothesis import strategies as st

import ragmesh

API_KEYS = {
    "alpha-key": "alice:alpha",
    "beta-key": "bob:beta",
    "fuzz-key": "mallory:fuzz:admin",
}
ALPHA = (("authorization", "Bearer alpha-key"),)
BETA = (("authorization", "Bearer beta-key"),)
FUZZ = (("authorization", "Bearer fuzz-key"),)
# Every answer in these tests comes long before; a call still open then is a hang.
CALL_SECONDS = 60
# Answers stay a few tokens long everywhere (the stored config and every override), and
# prompts within this context window.
MAX_NEW_TOKENS = 8
LLM_CONTEXT_TOKENS = 1024
# A phrase only alpha's data holds: seeing it in another tenant's answer is a leak.
ALPHA_SECRET = "quillwort"
ALPHA_TEXT = f"""# The Skerry Light

Ada Lund keeps the lighthouse on Skerry Rock. The lens is a first-order Fresnel lens,
ground in Paris in 1871; its code word is {ALPHA_SECRET}. Its beam reaches twenty-two
nautical miles on a clear night, and ships count its flashes: two short, one long.

## Storms

In the winter storms the keeper logs the wind every hour. Spray reaches the gallery and
salt crusts the windows, so the glass is washed at dawn.
"""
BETA_TEXT = """# Orchard notes

Apples are picked in September. The cider press runs on Saturdays and the pears ripen
late; the keeper of the orchard records each harvest in a ledger.
"""


class FuzzLog:
    """Outcomes per fuzzed RPC, printed after the run."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter] = defaultdict(Counter)

    def record(self, method: str, outcome: str) -> None:
        self.outcomes[method][outcome] += 1


FUZZ_LOG = FuzzLog()


FD = pb_descriptor.FieldDescriptor
# Services every server mounts besides its own; not part of ragmesh's contracts.
INFRASTRUCTURE = ("grpc.health.v1.", "grpc.reflection.")
# Statuses that mean the server did not handle the input: a crash or a hang.
UNDEFINED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
# Generation is capped so an example costs a few tokens, not a whole answer.
TOKEN_CAPS = {"max_new_tokens": (1, MAX_NEW_TOKENS)}
# Sizes of oversize strings and bytes: past every documented limit (64 characters for a
# tag, 4,096 for a query, 100,000 for an embed text).
OVERSIZE = [257, 4_097, 32_001, 100_001, 300_000]
# Lengths of oversize repeated fields: past the documented limits (8, 32, 100, 256).
OVERSIZE_COUNTS = [9, 33, 101, 257, 1_001]


def ragmesh_services() -> list[pb_descriptor.ServiceDescriptor]:
    """Every service declared by the generated modules under ragmesh/."""
    services = []
    for module in pkgutil.walk_packages(ragmesh.__path__, "ragmesh."):
        if module.name.endswith("_pb2"):
            file = importlib.import_module(module.name).DESCRIPTOR
            services.extend(file.services_by_name.values())
    return sorted(services, key=lambda s: s.full_name)


def ragmesh_methods() -> list[pb_descriptor.MethodDescriptor]:
    return [m for s in ragmesh_services() for m in s.methods]


def method_path(method: pb_descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(descriptor: pb_descriptor.Descriptor):
    return message_factory.GetMessageClass(descriptor)


def _is_map(field_descriptor: FD) -> bool:
    return field_descriptor.message_type is not None and (
        field_descriptor.message_type.GetOptions().map_entry
    )


def _is_repeated(field_descriptor: FD) -> bool:
    return field_descriptor.is_repeated


@dataclass
class Pools:
    """Values a hostile caller would try beyond random ones: real ids of other tenants
    and of its own, page tokens the services issued, and the field names of the
    contracts (for update masks)."""

    ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # The caller's own resources by field name ("document_id", "session_id"), for the
    # plausible requests hostile values are laid over.
    own: dict[str, str] = field(default_factory=dict)


_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _nested_json(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    _nested_json,
    max_leaves=6,
)


def _encoded(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def page_token_strategy(pools: Pools) -> st.SearchStrategy[str]:
    """Tokens a service issued, the same keys holding other values, other JSON, and
    text that is no token at all."""
    issued = [json.loads(base64.urlsafe_b64decode(t)) for t in pools.page_tokens]
    forged = [
        st.fixed_dictionaries({key: _json for key in position}).map(_encoded)
        for position in issued
        if isinstance(position, dict)
    ]
    return st.one_of(
        st.sampled_from(pools.page_tokens) if pools.page_tokens else st.nothing(),
        *forged,
        _json.map(_encoded),
        st.text(max_size=40),
    )


def _oversize_text() -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.characters(), st.sampled_from(OVERSIZE))


def _string_strategy(field_descriptor: FD, pools: Pools, small: bool) -> st.SearchStrategy:
    name = field_descriptor.name
    if name == "page_token":
        return page_token_strategy(pools)
    # Repeated branches weigh more: one_of picks a branch uniformly.
    choices = [st.text(max_size=40)] * 3
    if (name == "id" or name.endswith(("_id", "_ids"))) and pools.ids:
        choices += [st.sampled_from(pools.ids)] * 3
    if name == "paths" and pools.names:
        choices += [st.sampled_from(pools.names)] * 3
    if not small:
        choices.append(_oversize_text())
    return st.one_of(choices)


def _scalar_strategy(field_descriptor: FD, pools: Pools, small: bool) -> st.SearchStrategy:
    kind = field_descriptor.type
    if field_descriptor.name in TOKEN_CAPS:
        low, high = TOKEN_CAPS[field_descriptor.name]
        return st.integers(low, high)
    if kind == FD.TYPE_STRING:
        return _string_strategy(field_descriptor, pools, small)
    if kind == FD.TYPE_BYTES:
        if small:
            return st.binary(max_size=64)
        return st.binary(max_size=64) | st.builds(
            lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.sampled_from(OVERSIZE)
        )
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    # Small values, which most limits allow, weigh as much as the whole range.
    if kind == FD.TYPE_DOUBLE:
        return st.one_of(st.floats(0, 1), st.floats())
    if kind == FD.TYPE_FLOAT:
        return st.one_of(st.floats(0, 1, width=32), st.floats(width=32))
    if kind == FD.TYPE_ENUM:
        known = [v.number for v in field_descriptor.enum_type.values]
        return st.sampled_from(known) | st.integers(-(2**31), 2**31 - 1)
    low, high = _INT_RANGES[kind]
    return st.one_of(st.integers(0, 10), st.integers(low, high))


def _value_strategy(field_descriptor: FD, pools: Pools, depth: int, small: bool):
    if field_descriptor.type == FD.TYPE_MESSAGE:
        return message_strategy(field_descriptor.message_type, pools, depth + 1, small)
    return _scalar_strategy(field_descriptor, pools, small)


def _field_strategy(field_descriptor: FD, pools: Pools, depth: int, small: bool):
    if _is_map(field_descriptor):
        entry = field_descriptor.message_type
        key = _scalar_strategy(entry.fields_by_name["key"], pools, small=True)
        value = _value_strategy(entry.fields_by_name["value"], pools, depth, small=True)
        few = st.dictionaries(key, value, max_size=3)
        many = st.dictionaries(
            key, value, min_size=OVERSIZE_COUNTS[1], max_size=OVERSIZE_COUNTS[1] + 2
        )
        return st.one_of(few, few, few, many)
    if _is_repeated(field_descriptor):
        element = _value_strategy(field_descriptor, pools, depth, small)
        few = st.lists(element, max_size=3)
        if small:
            return few
        short = _value_strategy(field_descriptor, pools, depth, small=True)
        many = st.builds(lambda x, n: [x] * n, short, st.sampled_from(OVERSIZE_COUNTS))
        return st.one_of(few, few, few, many)
    return _value_strategy(field_descriptor, pools, depth, small)


def message_strategy(
    descriptor: pb_descriptor.Descriptor, pools: Pools, depth: int = 0, small: bool = False
) -> st.SearchStrategy:
    """Messages of this type with any subset of fields set to hostile values; at most
    one member of each oneof; nested messages down to depth 3."""
    cls = message_class(descriptor)
    if depth > 3:
        return st.just(cls())
    plain = {}
    oneofs = []
    for oneof in descriptor.oneofs:
        members = list(oneof.fields)
        if len(members) > 1:  # one member (proto3 `optional`) is set or not, as any field
            oneofs.append(members)
    in_oneof = {f.name for members in oneofs for f in members}
    for field_descriptor in descriptor.fields:
        if field_descriptor.name not in in_oneof:
            plain[field_descriptor.name] = st.deferred(
                lambda f=field_descriptor: _field_strategy(f, pools, depth, small)
            )
    parts = [st.fixed_dictionaries({}, optional=plain)]
    for members in oneofs:
        parts.append(
            st.one_of(
                st.just({}),
                *[
                    st.deferred(
                        lambda f=f: _field_strategy(f, pools, depth, small).map(
                            lambda v, name=f.name: {name: v}
                        )
                    )
                    for f in members
                ],
            )
        )

    def build(dicts) -> object:
        values = {}
        for part in dicts:
            values.update(part)
        return cls(**values)

    return st.tuples(*parts).map(build)


# What a plausible request holds in its text fields.
PLAUSIBLE_TEXT = {
    "query": "lighthouse lens",
    "content": "Where is the lighthouse?",
    "filename": "notes.txt",
}
PLAUSIBLE_TEXT["prompt"] = PLAUSIBLE_TEXT["content"]


def plausible_message(descriptor: pb_descriptor.Descriptor, own: dict[str, str], depth=0):
    """A request an ordinary caller might send, by field names: a short query, content
    or prompt; the caller's own ids; one user message in a list of chat messages; a
    nested resource (`session`) carrying the caller's own id."""
    message = message_class(descriptor)()
    for f in descriptor.fields:
        if f.name in PLAUSIBLE_TEXT and f.type == FD.TYPE_STRING:
            setattr(message, f.name, PLAUSIBLE_TEXT[f.name])
        elif f.name in own or f.name.removesuffix("s") in own:
            value = own.get(f.name) or own[f.name.removesuffix("s")]
            if f.is_repeated:
                getattr(message, f.name).append(value)
            else:
                setattr(message, f.name, value)
        elif f.type == FD.TYPE_ENUM and not f.is_repeated:
            users = [v.number for v in f.enum_type.values if v.name.endswith("_USER")]
            if users:
                setattr(message, f.name, users[0])
        elif f.message_type is not None and not _is_map(f) and depth < 2:
            nested = f.message_type
            if f.is_repeated and "content" in nested.fields_by_name:
                getattr(message, f.name).append(plausible_message(nested, own, depth + 1))
            elif not f.is_repeated and f"{f.name}_id" in own and "id" in nested.fields_by_name:
                getattr(message, f.name).id = own[f"{f.name}_id"]
    return message


def _merged(base, hostile):
    """base with hostile's set fields over it (lists appended)."""
    merged = type(base)()
    merged.CopyFrom(base)
    merged.MergeFrom(hostile)
    return merged


def request_strategy(method: pb_descriptor.MethodDescriptor, pools: Pools):
    """What a hostile caller sends to a method, as bytes: a generated message, the same
    laid over a plausible request (so validation passes more often and the deeper code
    runs), or random bytes; a list of them for a client stream."""
    hostile = message_strategy(method.input_type, pools)
    base = plausible_message(method.input_type, pools.own)
    alone = hostile.map(lambda m: m.SerializeToString())
    over = hostile.map(lambda m: _merged(base, m).SerializeToString())
    one = st.one_of(alone, over, over, st.binary(max_size=256))
    if method.client_streaming:
        return st.one_of(st.lists(one, max_size=4), *[_plausible_stream(method, pools)] * 2)
    return one


def _plausible_stream(method: pb_descriptor.MethodDescriptor, pools: Pools):
    """For a client stream whose message is a oneof of a message and bytes (a header,
    then data): a plausible header with hostile values over it, then random data."""
    cls = message_class(method.input_type)
    for oneof in method.input_type.oneofs:
        heads = [f for f in oneof.fields if f.message_type is not None]
        bodies = [f for f in oneof.fields if f.type == FD.TYPE_BYTES]
        if heads and bodies:
            head, body = heads[0], bodies[0]
            base = plausible_message(head.message_type, pools.own)
            first = message_strategy(head.message_type, pools, depth=1).map(
                lambda m, name=head.name, base=base: cls(
                    **{name: _merged(base, m)}
                ).SerializeToString()
            )
            data = st.binary(min_size=1, max_size=4096).map(
                lambda b, name=body.name: cls(**{name: b}).SerializeToString()
            )
            return st.tuples(first, st.lists(data, min_size=1, max_size=3)).map(
                lambda parts: [parts[0], *parts[1]]
            )
    return st.nothing()


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list = field(default_factory=list)
    cancelled_by_us: bool = False

    @property
    def defined(self) -> bool:
        """A status the service chose, with a message; a stream still sending when we
        stopped reading counts as handled."""
        if self.cancelled_by_us:
            return True
        if self.code == grpc.StatusCode.OK:
            return True
        return self.code not in UNDEFINED and bool(self.details.strip())


# A stream still sending this long after its first message is stopped: watches never end.
STREAM_GRACE_SECONDS = 0.5
STREAM_MAX_RESPONSES = 64


def raw_call(channel, method, payload, metadata, timeout: float) -> Outcome:
    """Sends payload (bytes, or a list of bytes for a client stream) and reads the
    answer, each response parsed with the method's response type; returns the status
    the call ended with and the responses."""
    path = method_path(method)
    response = message_class(method.output_type).FromString
    kind = (method.client_streaming, method.server_streaming)
    if kind == (False, False):
        call = channel.unary_unary(path, response_deserializer=response)
    elif kind == (True, False):
        call = channel.stream_unary(path, response_deserializer=response)
    elif kind == (False, True):
        call = channel.unary_stream(path, response_deserializer=response)
    else:
        call = channel.stream_stream(path, response_deserializer=response)
    request = iter(payload) if method.client_streaming else payload
    if not method.server_streaming:
        try:
            reply = call(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "")
        return Outcome(grpc.StatusCode.OK, "", [reply])
    stream = call(request, metadata=metadata, timeout=timeout)
    received = []
    stop: list[threading.Timer] = []
    try:
        for reply in stream:
            received.append(reply)
            if len(received) >= STREAM_MAX_RESPONSES:
                stream.cancel()
                break
            if not stop:
                stop.append(threading.Timer(STREAM_GRACE_SECONDS, stream.cancel))
                stop[0].start()
    except grpc.RpcError as exc:
        code = exc.code()
        ours = code == grpc.StatusCode.CANCELLED and bool(received)
        return Outcome(code, exc.details() or "", received, cancelled_by_us=ours)
    finally:
        for timer in stop:
            timer.cancel()
    if len(received) >= STREAM_MAX_RESPONSES:
        return Outcome(grpc.StatusCode.CANCELLED, "", received, cancelled_by_us=True)
    return Outcome(grpc.StatusCode.OK, "", received)
