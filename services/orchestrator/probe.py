"""Readiness of a Triton replica over its gRPC health API, and its metrics page over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import aiohttp
import tritonclient.grpc.aio as triton

from llmmesh.common.channels import RECONNECT_OPTIONS
from services.orchestrator.settings import ReplicaSpec

# A probe client unused this long most likely belongs to a replica gone (one still there that
# was not probed meanwhile gets a new client at its next probe: a channel set up again).
IDLE_CLOSE_S = 600.0


class TritonProbe:
    """Ready = every model the replica should serve (`ReplicaSpec.models`, default
    `TRITON_MODEL`) ready, which Triton answers only while the server is ready too (`ready`).

    Not enough on its own: Triton 2.51 keeps answering ServerReady and ModelReady true after the
    model's Python-backend stub died (observed: every request then fails with "Stub process
    '<model>_0_0' is not healthy."). Such a replica is caught by its requests instead: the
    gateway classifies that error as a replica fault (`services.gateway.faults`) and `Health`
    ejects on consecutive errors or the failure share."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        """`clock`: seconds, monotonic (the event loop's by default)."""
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        # Per (address, authority): its client and when a probe last used it. Replicas come
        # and go (a pod's address each): a client unused for IDLE_CLOSE_S is closed, at most
        # every tenth of that, so the map holds the replicas of the last minutes, not every
        # address ever probed (each a channel).
        self._clients: dict[tuple[str, str], tuple[triton.InferenceServerClient, float]] = {}
        self._swept: float | None = None  # the last sweep (the first probe's time before one)

    def _client(self, address: str, authority: str, now: float) -> triton.InferenceServerClient:
        key = (address, authority)
        entry = self._clients.get(key)
        if entry is None:
            # A restarted replica (same address) is probed ready within a second of serving.
            args: list[tuple[str, str | int]] = list(RECONNECT_OPTIONS)
            if authority:
                args.append(("grpc.default_authority", authority))
            client = triton.InferenceServerClient(url=address, channel_args=args)
        else:
            client = entry[0]
        self._clients[key] = (client, now)
        return client

    async def _sweep(self, now: float) -> None:
        if self._swept is None:
            self._swept = now
        if now - self._swept < IDLE_CLOSE_S / 10:
            return
        self._swept = now
        idle = [k for k, (_, used) in self._clients.items() if now - used > IDLE_CLOSE_S]
        for key in idle:
            client, _ = self._clients.pop(key)
            await client.close()

    async def ready(self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float) -> bool:
        """One ModelReady call per model (ServerReady only when given none): Triton answers
        ModelReady with UNAVAILABLE ("Server not ready", raised here) unless the server itself
        is ready, so a separate ServerReady call would only repeat that check, at the cost of
        a second gRPC round trip per replica and round (~0.4 ms of the orchestrator's CPU each
        on the reference machine). Unlike ServerReady under Triton's strict readiness, another
        model of the repository failing does not make this replica unready for its own."""
        now = self._clock()
        await self._sweep(now)
        client = self._client(replica.grpc_address, replica.authority, now)
        if not models:
            return bool(await client.is_server_ready(client_timeout=timeout_s))
        for model in models:
            if not await client.is_model_ready(model, client_timeout=timeout_s):
                return False
        return True

    @property
    def clients(self) -> int:
        """Replica clients held (one per address and authority probed lately)."""
        return len(self._clients)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client, _ in clients.values():
            await client.close()


class HttpMetrics:
    """Replicas' metrics pages, fetched in the event loop over kept-alive HTTP/1.1 connections
    (one pool for every replica, reused round after round: no connection set up per scrape, no
    worker thread contending for the interpreter with the Admits). A status other than 2xx, a
    timeout or a refused connection raises: that round has no sample for the replica."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str, host: str, timeout_s: float) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), raise_for_status=True
            )
        async with self._session.get(
            url,
            headers={"Host": host} if host else None,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            return await resp.text(errors="replace")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
