"""What a refused call carries besides its code: the ErrorInfo of its google.rpc.Status."""

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail a failed call carries."""
    status = rpc_status.from_call(exc)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {status}")
