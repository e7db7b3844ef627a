"""A request's attempts on replicas: admit, stream from the leased replica, and on a replica
failure admit again elsewhere and continue the same stream (request migration; the rules are in
`services.gateway.core`'s docstring). `GatewayCore` validates, accounts and owns the request;
`Attempts` owns everything between a validated request and its events.

Invariants: every granted lease is reported once, however its attempt ends; a replica that
faulted is excluded from the request's later admissions; a replica-wide fault one stream sees
ends every other stream's wait on that replica (`replica_watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from llmmesh.common.errors import DeadlineExceeded, ResourceExhausted, ServiceError
from llmmesh.common.telemetry import inject_trace_metadata
from llmmesh.common.topology import Priority
from services.gateway import metrics
from services.gateway.admission import AdmissionClient, AdmissionRequest, Lease, Outcome
from services.gateway.errors import InvalidRequest, NoReplica, ReplicaFailed
from services.gateway.events import Event
from services.gateway.faults import Fault, FaultKind, attempt_error
from services.gateway.generation import GenerationRequest
from services.gateway.models import ServedModel
from services.gateway.replica_watch import STALLED, ReplicaWatch
from services.gateway.settings import GatewaySettings
from services.gateway.stream_state import StreamState
from services.gateway.triton_stream import (
    EngineCallStopped,
    EngineClient,
    EngineRequest,
    TritonStreamError,
)

__all__ = ["AttemptFailed", "Attempts", "Validated"]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("llmmesh.gateway")

# `llmmesh_gateway_migrations_total{phase}`
_BEFORE_FIRST_TOKEN = "before_first_token"
_MID_STREAM = "mid_stream"


def _tripped(fault: Fault) -> TritonStreamError:
    return TritonStreamError(f"another stream saw this replica fail ({fault.reason})", fault)


class AttemptFailed(Exception):
    """One attempt's engine call failed; `error` is what the client gets if it is not retried,
    `fault` whose fault it was (`services.gateway.faults`)."""

    def __init__(self, error: ServiceError, fault: Fault):
        super().__init__(str(error))
        self.error = error
        self.fault = fault


@dataclass(frozen=True, slots=True)
class Validated:
    """A request the core validated: what every attempt needs."""

    model: ServedModel
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None


@dataclass(slots=True)
class Tries:
    """The request's leases, each appended when granted (its attempt failed or not), and
    whether the last one's attempt failed: no replica serves the request then, while it waits
    to be admitted again."""

    leases: list[Lease] = field(default_factory=list)
    last_failed: bool = False

    @property
    def serving(self) -> bool:
        """A replica holds the request now: its last lease's attempt has not failed."""
        return bool(self.leases) and not self.last_failed


class Attempts:
    def __init__(
        self, settings: GatewaySettings, admission: AdmissionClient, triton: EngineClient
    ) -> None:
        self._s = settings
        self._admission = admission
        self._triton = triton
        self._watch = ReplicaWatch()

    async def run(
        self,
        req: GenerationRequest,
        v: Validated,
        state: StreamState,
        deadline: float,
        span: trace.Span,
        tries: Tries,
    ) -> AsyncGenerator[Event, None]:
        """The request's attempts: admit, stream, and on a replica failure admit again elsewhere
        and continue (module docstring: request migration). Every granted lease is appended to
        `tries`, which says whether the last attempt failed."""
        s = self._s
        excluded: set[str] = set()  # the replicas that failed the request
        full: str | None = None  # the one a continuation found full: not the next one
        retries = migrations = 0
        failed: AttemptFailed | None = None  # the last attempt's failure, being recovered from
        phase = ""
        while True:
            try:
                lease = await self._admit(
                    req, v, state, deadline, excluded if full is None else excluded | {full}
                )
            except ServiceError as err:
                if failed is None:
                    raise
                metrics.record_migration(phase, "admission_failed")
                log.warning(
                    "no replica to continue on",
                    extra={"request_id": req.request_id, "phase": phase, "error": str(err)},
                )
                if phase == _BEFORE_FIRST_TOKEN and full is not None and isinstance(err, NoReplica):
                    # The only replica was the one passed over (full, or refusing): its
                    # answer (RESOURCE_EXHAUSTED with a retry-after, ...), not "no replica".
                    raise failed.error from failed.__cause__
                if phase == _BEFORE_FIRST_TOKEN or isinstance(err, DeadlineExceeded):
                    # Nothing was sent yet (as if it were the first admission), or the
                    # request's own deadline passed: that, not the replica's failure.
                    raise
                raise ReplicaFailed(
                    f"{failed.error}; no other replica could continue it: {err}"
                ) from err
            if failed is not None:
                metrics.record_migration(phase, "migrated")
                log.warning(
                    "request migrated",
                    extra={
                        "request_id": req.request_id,
                        "phase": phase,
                        "replica": lease.replica.id,
                        "tokens": state.completion_tokens,
                    },
                )
                span.add_event(
                    "migration.admitted",
                    {"llmmesh.replica": lease.replica.id, "llmmesh.phase": phase},
                )
            tries.leases.append(lease)
            tries.last_failed = False
            span.set_attribute("llmmesh.replica", lease.replica.id)
            try:
                attempt = self._stream(req, v, lease, state, deadline, tries.leases)
                async with contextlib.aclosing(attempt) as events:  # closed in this task
                    async for ev in events:
                        yield ev
                return
            except AttemptFailed as err:
                failed = err
                tries.last_failed = True
                kind = err.fault.kind
                if isinstance(err.error, InvalidRequest):
                    # The client's own input: every replica of the deployment refuses it.
                    raise err.error from err.__cause__
                if state.completion_tokens == 0:
                    # Nothing reached the client yet: any engine failure is retried elsewhere
                    # (a refusal no rule names may be a replica's all the same).
                    phase, allowed = _BEFORE_FIRST_TOKEN, retries < s.retries_before_first_token
                    retries += 1
                else:
                    if kind is FaultKind.REQUEST:
                        raise err.error from err.__cause__  # another replica would refuse it too
                    # A replica failed, or the one a continuation was given was full: the
                    # stream goes on elsewhere (a refusal would end a stream already started).
                    phase, allowed = _MID_STREAM, migrations < s.max_migrations
                    migrations += 1
                # A failed replica is not asked again; one that was full or refused is passed
                # over for the next admission only (the orchestrator, blind to the engine's
                # queue and keen on its cached prefix, would likely choose it again).
                full = None
                if err.fault.replica_fault:
                    excluded.add(lease.replica.id)
                else:
                    full = lease.replica.id
                span.add_event(
                    "migration",
                    {
                        "llmmesh.replica": lease.replica.id,
                        "llmmesh.phase": phase,
                        "llmmesh.tokens": state.completion_tokens,
                        "llmmesh.error": str(err.error),
                        "llmmesh.allowed": allowed,
                    },
                )
                if not allowed:
                    metrics.record_migration(phase, "limit_reached")
                    raise err.error from err.__cause__
                log.warning(
                    "replica failed; admitting the request again elsewhere",
                    extra={
                        "request_id": req.request_id,
                        "phase": phase,
                        "replica": lease.replica.id,
                        "tokens": state.completion_tokens,
                        "error": str(err.error),
                    },
                )
                state.begin_attempt(time.perf_counter())

    async def _admit(
        self,
        req: GenerationRequest,
        v: Validated,
        state: StreamState,
        deadline: float,
        excluded: set[str],
    ) -> Lease:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:  # a lease now could only be wasted
            raise DeadlineExceeded("the request's deadline passed before it was admitted")
        cap = self._s.admission_max_wait_s
        if cap is None or cap >= remaining:
            return await self._admit_once(req, v, state, remaining, excluded)
        try:
            return await self._admit_once(req, v, state, cap, excluded)
        except DeadlineExceeded as err:
            # The gateway's admission wait bound, not the client's deadline, ran out.
            raise ResourceExhausted(
                f"not admitted within admission_max_wait_s ({cap:g} s)",
                retry_after_s=cap,
                reason=err.reason,
            ) from err

    async def _admit_once(
        self,
        req: GenerationRequest,
        v: Validated,
        state: StreamState,
        timeout_s: float,
        excluded: set[str],
    ) -> Lease:
        return await self._admission.admit(
            AdmissionRequest(
                request_id=req.request_id,
                model=v.model.settings.triton_model,
                prompt_token_ids=state.continuation(),
                max_tokens=state.remaining,
                priority=Priority.BATCH if self._s.shadow else req.priority,
                tenant=req.tenant,
                model_version=self._s.model_version,
                exclude_replicas=frozenset(excluded),
            ),
            timeout_s=timeout_s,
        )

    async def _stream(
        self,
        req: GenerationRequest,
        v: Validated,
        lease: Lease,
        state: StreamState,
        deadline: float,
        leases: Sequence[Lease],
    ) -> AsyncGenerator[Event, None]:
        """One attempt on the leased replica, continuing `state`; its lease is reported once,
        however it ends. A replica failure is `AttemptFailed`."""
        replica = lease.replica
        model = v.model.settings.triton_model
        continued = state.completion_tokens > 0  # a continuation: prompt + generated tokens
        state.serve_on(replica)
        stall = self._s.stall_timeout_s or None
        outcome = Outcome.REQUEST_ERROR
        error = ""
        try:
            with _tracer.start_as_current_span("triton.stream", kind=SpanKind.CLIENT) as span:
                span.set_attribute("llmmesh.replica", replica.id)
                chunks = self._triton.stream(
                    replica.grpc_address,
                    replica.authority,
                    self.engine_request(req, v, state),
                    timeout_s=max(deadline - time.perf_counter(), 0.001),
                    metadata=inject_trace_metadata([]),
                )
                async with contextlib.aclosing(chunks):
                    with self._watch.attempt(replica.id, model) as wait:
                        while True:
                            if wait.tripped is not None:  # tripped between reads
                                raise _tripped(wait.tripped)
                            wait.reading(stall if state.completion_tokens else None)
                            try:
                                chunk = await anext(chunks)
                            except StopAsyncIteration:
                                break
                            except asyncio.CancelledError:
                                why = wait.interrupted()
                                if why is None:
                                    raise
                                if why == STALLED:
                                    raise TritonStreamError(
                                        f"no token within the stall timeout ({stall:g} s)",
                                        replica_fault=True,
                                    ) from None
                                assert isinstance(why, Fault)
                                raise _tripped(why) from None
                            except TritonStreamError as err:
                                if err.fault.replica_wide:
                                    self._watch.trip(replica.id, model, err.fault, source=wait)
                                raise
                            finally:
                                wait.idle()
                            delta = state.push(chunk)
                            if delta is not None:
                                yield delta
                            if state.finish is not None or chunk.final:
                                break
                tail = state.end()
                if tail is not None:
                    yield tail
            outcome = Outcome.SUCCESS
        except TritonStreamError as err:
            error = str(err)
            outcome = Outcome.REPLICA_ERROR if err.replica_fault else Outcome.REQUEST_ERROR
            refusal = attempt_error(err.fault, replica.id, str(err), clients_input=not continued)
            raise AttemptFailed(refusal, err.fault) from err
        except EngineCallStopped as err:
            outcome = Outcome.CANCELLED
            error = str(err.error)
            raise err.error from err
        except (asyncio.CancelledError, GeneratorExit):
            outcome = Outcome.CANCELLED
            raise
        finally:
            self._admission.complete(state.report(lease.lease_id, outcome, error))
            state.end_attempt()
        yield state.completion(sum(x.queue_ms for x in leases), replica.id)

    @staticmethod
    def engine_request(req: GenerationRequest, v: Validated, state: StreamState) -> EngineRequest:
        """The attempt's engine request: a continuation's input is the prompt plus the tokens
        generated so far, its max_tokens what remains."""
        return EngineRequest(
            request_id=req.request_id,
            model=v.model.settings.triton_model,
            input_ids=state.continuation(),
            max_tokens=state.remaining,
            end_id=v.model.end_id,
            temperature=v.temperature,
            top_p=v.top_p,
            top_k=v.top_k,
            seed=v.seed,
        )
