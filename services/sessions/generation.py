"""Generation overrides as sessions keep them: a dict of the fields set, checked against
the llm contract's ranges, merged session first and message over it field by field."""

from ragmesh.llm.v1 import llm_pb2
from services.common.errors import InvalidArgument

_SCALARS = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed")


def overrides_from_pb(pb: llm_pb2.GenerationOverrides) -> dict:
    values = {name: getattr(pb, name) for name in _SCALARS if pb.HasField(name)}
    if pb.stop_sequences:
        values["stop_sequences"] = list(pb.stop_sequences)
    return values


def overrides_to_pb(values: dict) -> llm_pb2.GenerationOverrides:
    return llm_pb2.GenerationOverrides(**values)


def check_overrides(values: dict, field: str) -> None:
    """INVALID_ARGUMENT with a violation per value outside what the llm service accepts."""
    rules = {
        "temperature": (lambda v: 0 <= v <= 2, "must be between 0 and 2"),
        "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "max_new_tokens": (lambda v: v >= 1, "must be at least 1"),
        "repetition_penalty": (lambda v: 1 <= v <= 2, "must be between 1.0 and 2.0"),
    }
    violations = [
        (f"{field}.{name}", message)
        for name, (ok, message) in rules.items()
        if name in values and not ok(values[name])
    ]
    stops = values.get("stop_sequences", [])
    if len(stops) > 8 or any(not s or len(s) > 64 for s in stops):
        violations.append((f"{field}.stop_sequences", "at most 8, each 1 to 64 characters"))
    if violations:
        raise InvalidArgument(
            f"{field}: " + "; ".join(f"{f} {m}" for f, m in violations),
            field_violations=violations,
        )


def merged(session_values: dict, message_values: dict) -> dict:
    return {**session_values, **message_values}
