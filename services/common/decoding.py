"""Requests that do not decode answer INVALID_ARGUMENT instead of grpcio's UNKNOWN.

grpcio ends a call whose request bytes fail to parse with UNKNOWN ("Unexpected
DecodeError"), before any interceptor runs. `reject_undecodable` wraps a method handler
so the deserializer hands the handler a marker instead, and the handler raises
InvalidArgument for it: from the request of a unary call, or when a client stream
reaches the bad message (the messages before it are handled as usual).
"""

import grpc

from services.common.errors import InvalidArgument


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return deserialize


def _refuse(method: str, bad: _Undecodable) -> InvalidArgument:
    return InvalidArgument(
        f"the request is not a valid message for {method}: {bad.error}",
        reason="MALFORMED_REQUEST",
    )


def _checked_request(method: str, behavior):
    def checked(request, context):
        if isinstance(request, _Undecodable):
            raise _refuse(method, request)
        return behavior(request, context)

    return checked


def _checked_stream(method: str, behavior):
    async def messages(request_iterator):
        async for request in request_iterator:
            if isinstance(request, _Undecodable):
                raise _refuse(method, request)
            yield request

    def checked(request_iterator, context):
        return behavior(messages(request_iterator), context)

    return checked


def reject_undecodable(handler, method: str):
    """handler with undecodable requests turned into InvalidArgument (None stays None)."""
    if handler is None:
        return None
    deserializer = _tolerant(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        behavior = _checked_stream(method, handler.stream_stream)
        return grpc.stream_stream_rpc_method_handler(behavior, deserializer, serializer)
    if handler.request_streaming:
        behavior = _checked_stream(method, handler.stream_unary)
        return grpc.stream_unary_rpc_method_handler(behavior, deserializer, serializer)
    if handler.response_streaming:
        behavior = _checked_request(method, handler.unary_stream)
        return grpc.unary_stream_rpc_method_handler(behavior, deserializer, serializer)
    behavior = _checked_request(method, handler.unary_unary)
    return grpc.unary_unary_rpc_method_handler(behavior, deserializer, serializer)
