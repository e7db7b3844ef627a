"""Where the kv_registry replicas are, for their clients (engine publishers, the orchestrator).

kv_registry runs as two or more independent replicas; nothing is shared between them. Every
engine publishes its KV events to each of them, and the orchestrator reads from any healthy one.
A client knows the replicas from static addresses (`KV_REGISTRY_ADDRESS`, `KV_REGISTRY_ADDRESSES`)
and/or a headless Service (`KV_REGISTRY_DNS`, `host:port`) whose A records are the registry pods,
resolved every `KV_REGISTRY_DNS_INTERVAL_S`. A pod found through DNS is dialed at its IP with the
Service's `host:port` as `:authority`, so an Istio sidecar routes it through the Service's
cluster (mTLS, authorization), as the gateway does for Triton pods.

This module is the one home of these settings' defaults and parsing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmmesh.common.channels import RECONNECT_OPTIONS
from llmmesh.common.discovery import resolve_ipv4

log = logging.getLogger(__name__)

# Defaults of the registry settings every client has (engines and orchestrator alike).
DNS_INTERVAL_S = 5.0  # KV_REGISTRY_DNS_INTERVAL_S: seconds between resolutions of KV_REGISTRY_DNS
RETRY_S = 2.0  # KV_REGISTRY_RETRY_S (readers): a replica that failed a call is skipped this long


def check_host_port(value: str) -> str:
    """`value` if it is `host:port` (for settings validators); ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} must be host:port")
    return value


@dataclass(frozen=True, slots=True)
class RegistryEndpoint:
    """One kv_registry replica: the address dialed, and the `:authority` to send (DNS-found
    pods: the Service's host:port; static addresses: none, gRPC uses the address)."""

    address: str
    authority: str | None = None

    def channel_options(self) -> list[tuple[str, int | str]]:
        opts: list[tuple[str, int | str]] = list(RECONNECT_OPTIONS)
        if self.authority:
            opts.append(("grpc.default_authority", self.authority))
        return opts


def static_endpoints(address: str | None, addresses: Iterable[str]) -> list[RegistryEndpoint]:
    """The single-address setting first, then the list; duplicates once, in that order."""
    seen: dict[str, RegistryEndpoint] = {}
    for a in [address, *addresses]:
        if a and a not in seen:
            seen[a] = RegistryEndpoint(a)
    return list(seen.values())


def _split(dns: str) -> tuple[str, int]:
    host, _, port = check_host_port(dns).rpartition(":")
    return host, int(port)


def _endpoints(dns: str, ips: Iterable[str]) -> list[RegistryEndpoint]:
    _, port = _split(dns)
    return [RegistryEndpoint(f"{ip}:{port}", dns) for ip in sorted(set(ips))]


def resolve_dns_sync(dns: str) -> list[RegistryEndpoint] | None:
    """The pods behind `dns` (`host:port`), sorted by IP; None when resolution failed (callers
    keep what they had). For the engines' publisher thread, which has no event loop."""
    host, port = _split(dns)
    try:
        infos = socket.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("kv_registry dns resolution failed: %s: %r", host, exc)
        return None
    return _endpoints(dns, (str(info[4][0]) for info in infos))


async def resolve_dns(dns: str) -> list[RegistryEndpoint] | None:
    """`resolve_dns_sync` on the event loop (`llmmesh.common.discovery.resolve_ipv4`)."""
    host, port = _split(dns)
    try:
        ips = await resolve_ipv4(host, port)
    except OSError as exc:
        log.warning("kv_registry dns resolution failed: %s: %r", host, exc)
        return None
    return _endpoints(dns, ips)


def merge(
    static: Sequence[RegistryEndpoint], discovered: Sequence[RegistryEndpoint]
) -> list[RegistryEndpoint]:
    """Static endpoints first, then discovered ones not already listed (by address)."""
    known = {e.address for e in static}
    return [*static, *(e for e in discovered if e.address not in known)]
