"""Asks the telemetry services of the other nodes for their snapshots (GetSystemStatus).

Each configured peer is host:port. The host is resolved on every check and each address
it gives is one peer, so a headless Service over the telemetry DaemonSet names every
node's pod, those started since the last check included."""

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass

import grpc

from ragmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.clients import open_channel

Stub = telemetry_pb2_grpc.TelemetryServiceStub


@dataclass
class PeerAnswer:
    # The address asked (an IP and port), or the configured peer when it did not resolve.
    target: str
    # None when the peer did not answer; error then says why.
    status: telemetry_pb2.SystemStatus | None
    latency_seconds: float | None
    error: str


class Peers:
    """Keeps one channel per resolved peer address, opened when the address first appears
    and closed when it is gone from DNS or its peer did not answer."""

    def __init__(self, peers: list[str], timeout_seconds: float, api_key: str) -> None:
        self._peers = list(peers)
        self._timeout = timeout_seconds
        self._api_key = api_key
        self._channels: dict[str, tuple[grpc.aio.Channel, Stub]] = {}

    async def ask_all(self) -> list[PeerAnswer]:
        resolved = await asyncio.gather(*(self._resolve(peer) for peer in self._peers))
        addresses: list[str] = []
        answers: list[PeerAnswer] = []
        for peer, (found, error) in zip(self._peers, resolved, strict=True):
            if error:
                answers.append(PeerAnswer(peer, None, None, error))
            addresses.extend(a for a in found if a not in addresses)
        stubs = await self._keep_channels_for(addresses)
        answers.extend(await asyncio.gather(*(self._ask(a, stubs[a]) for a in addresses)))
        return answers

    async def _resolve(self, peer: str) -> tuple[list[str], str]:
        """peer's addresses as host:port, or none and why."""
        host, _, port = peer.rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
            return [peer], ""
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except TimeoutError:
            return [], f"{host} did not resolve within {self._timeout:g} s"
        except socket.gaierror as exc:
            return [], f"{host} does not resolve: {exc.strerror}"
        addresses = []
        for family, *_, sockaddr in infos:
            ip = sockaddr[0]
            address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if address not in addresses:
                addresses.append(address)
        return addresses, ""

    async def _keep_channels_for(self, addresses: list[str]) -> dict[str, Stub]:
        for gone in set(self._channels) - set(addresses):
            if (entry := self._channels.pop(gone, None)) is not None:
                await entry[0].close()
        for address in addresses:
            if address not in self._channels:
                # The service's own key when one is set; otherwise the caller's.
                channel = open_channel(
                    address,
                    default_timeout=self._timeout,
                    api_key=self._api_key,
                    forward_caller=False,
                )
                self._channels[address] = (channel, Stub(channel))
        return {address: self._channels[address][1] for address in addresses}

    async def _ask(self, address: str, stub: Stub) -> PeerAnswer:
        started = time.perf_counter()
        try:
            response = await stub.GetSystemStatus(
                telemetry_pb2.GetSystemStatusRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            # A fresh channel next time: this one would wait out gRPC's reconnect backoff
            # (up to 2 minutes) before it tried a peer that has come back.
            channel, current = self._channels.get(address, (None, None))
            if current is stub:
                del self._channels[address]
                await channel.close()
            return PeerAnswer(address, None, None, f"{exc.code().name}: {exc.details()}")
        return PeerAnswer(address, response.status, time.perf_counter() - started, "")

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
