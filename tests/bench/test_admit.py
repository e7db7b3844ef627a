"""bench-admit's open-loop driver counts every Admit it sends, and how late it sent it."""

from __future__ import annotations

import asyncio

from bench.admit import drive
from llmmesh.common.errors import ResourceExhausted
from llmmesh.common.topology import Priority, ReplicaAddress
from services.gateway.admission import AdmissionRequest, Lease, LeaseReport


class FakeAdmitter:
    """Grants every Admit but the 3rd (shed) and the 5th (a bug: no ServiceError)."""

    def __init__(self) -> None:
        self.calls = 0
        self.completed: list[LeaseReport] = []

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        self.calls += 1
        n = self.calls  # this call's number (others may come in while it yields)
        await asyncio.sleep(0)
        if n == 3:
            raise ResourceExhausted("shed", retry_after_s=1.0)
        if n == 5:
            raise KeyError("boom")
        return Lease(f"l{n}", ReplicaAddress("r", "127.0.0.1:1"), queue_ms=0.5)

    def complete(self, report: LeaseReport) -> None:
        self.completed.append(report)

    async def drain(self) -> None:
        return None


async def test_every_admit_sent_is_granted_or_counted_by_its_failure() -> None:
    admitter = FakeAdmitter()
    request = AdmissionRequest("q", "m", [1, 2, 3], 4, Priority.STANDARD, "", "")
    out = await drive(admitter, [request], rate=200, duration_s=0.05)  # type: ignore[arg-type]
    sent = 10
    assert admitter.calls == sent
    assert out.errors == {"RESOURCE_EXHAUSTED": 1, "KeyError": 1}
    assert len(out.client_s) + sum(out.errors.values()) == sent
    assert len(admitter.completed) == len(out.client_s) == 8
    assert out.internal_s == [0.0005] * 8
    assert len(out.lag_s) == sent
    assert all(lag >= 0 for lag in out.lag_s)
