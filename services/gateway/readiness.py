"""Readiness: whether this gateway can serve a request now.

Ready means the orchestrator answered within `readiness_timeout_s` and knows at least one replica
that can take a lease (probed ready, not ejected, not draining). Liveness is the fronts' own
business (the process answers); readiness is what a balancer or router in front of several
gateways asks before sending one traffic.

Invariant: at most one replica-view call is in flight per gateway; concurrent readiness checks
share it, so probes from many routers never multiply the load on the orchestrator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from llmmesh.common.errors import ServiceError
from services.gateway.admission import AdmissionClient, AdmissionStatus

__all__ = ["Readiness", "ReadinessCheck"]


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str  # why not ready; "" when ready
    models: Sequence[str]
    status: AdmissionStatus | None  # None when the orchestrator did not answer


class ReadinessCheck:
    def __init__(self, admission: AdmissionClient, models: Sequence[str], timeout_s: float):
        self._admission = admission
        self._models = tuple(models)
        self._timeout_s = timeout_s
        self._inflight: asyncio.Future[Readiness] | None = None

    async def check(self) -> Readiness:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._check())
        # A caller that goes away must not cancel the call the others share.
        return await asyncio.shield(self._inflight)

    async def _check(self) -> Readiness:
        if not self._models:
            return Readiness(False, "no model configured", self._models, None)
        try:
            async with asyncio.timeout(self._timeout_s):
                status = await self._admission.status(timeout_s=self._timeout_s)
        except (ServiceError, TimeoutError) as err:
            reason = str(err) or "no answer within the readiness timeout"
            return Readiness(False, f"orchestrator unreachable: {reason}", self._models, None)
        if status.ready_replicas == 0:
            why = f"no ready replica ({status.replicas} known)"
            return Readiness(False, why, self._models, status)
        return Readiness(True, "", self._models, status)
