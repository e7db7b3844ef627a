"""Every registered filter keeps the `Filter` contract: it judges a request by its model,
model_version, pools and known_pools only, so requests of one kind (`Orchestrator._kind`) pass
the filters on the same replicas whatever their prompt length, max tokens or cached prefix.
The queue pass decides once per kind on that promise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.orchestrator.scheduling.contracts import ReplicaLoad, ReplicaView, RequestView
from services.orchestrator.scheduling.registry import default_registry

REGISTRY = default_registry()
FILTERS = [t for t in REGISTRY.types() if REGISTRY.spec(t).kind == "filter"]
POOLS = ("short", "long", "other")
VERSIONS = ("", "a", "b")
MODELS = ("m", "n")
IDS = [f"r{i}" for i in range(6)]


@st.composite
def replica(draw: st.DrawFn, rid: str) -> ReplicaView:
    cap = draw(st.integers(0, 8))
    load = draw(
        st.none()
        | st.builds(
            ReplicaLoad,
            prefill_tokens=st.integers(0, 100_000),
            prefill_s=st.floats(0, 10),
            decode_seqs=st.integers(0, 64),
            decode_tokens=st.integers(0, 500_000),
            kv_free_tokens=st.none() | st.integers(0, 200_000),
            kv_return_per_s=st.none() | st.floats(0, 1e5),
        )
    )
    return ReplicaView(
        id=rid,
        pool=draw(st.sampled_from(POOLS)),
        model_version=draw(st.sampled_from(VERSIONS)),
        models=tuple(draw(st.lists(st.sampled_from(MODELS), max_size=2, unique=True))),
        ready=draw(st.booleans()),
        ejected=draw(st.booleans()),
        in_flight=draw(st.integers(0, 10)),
        cap=cap,
        engine_active=draw(st.none() | st.floats(0, 64)),
        engine_waiting=draw(st.none() | st.floats(0, 64)),
        kv_utilization=draw(st.none() | st.floats(0, 1)),
        recent_failures=draw(st.integers(0, 5)),
        load=load,
    )


@st.composite
def of_a_kind(draw: st.DrawFn) -> tuple[RequestView, RequestView]:
    """Two requests of one kind: the same model, version and pools, all else drawn apart."""
    model = draw(st.sampled_from(MODELS))
    version = draw(st.sampled_from(VERSIONS))
    pools = draw(st.none() | st.lists(st.sampled_from(POOLS[:2]), min_size=1, unique=True))
    known = frozenset(POOLS[:2]) if pools is not None else frozenset()

    def one() -> RequestView:
        blocks = draw(st.integers(0, 64))
        return RequestView(
            model=model,
            model_version=version,
            prompt_tokens=draw(st.integers(1, 64_000)),
            max_tokens=draw(st.integers(1, 8_000)),
            prefix_blocks=draw(
                st.dictionaries(st.sampled_from(IDS), st.integers(0, blocks), max_size=4)
            ),
            prompt_blocks=blocks,
            pools=None if pools is None else tuple(pools),
            known_pools=known,
        )

    return one(), one()


def test_the_registry_has_filters() -> None:
    assert {"healthy-filter", "model-version-filter", "pool-filter"} <= set(FILTERS)


@settings(max_examples=300, deadline=None)
@given(
    replicas=st.lists(st.sampled_from(IDS), min_size=1, max_size=6, unique=True).flatmap(
        lambda ids: st.tuples(*(replica(rid) for rid in ids))
    ),
    requests=of_a_kind(),
)
def test_requests_of_one_kind_pass_every_filter_on_the_same_replicas(
    replicas: tuple[ReplicaView, ...], requests: tuple[RequestView, RequestView]
) -> None:
    first, second = requests
    for plugin_type in FILTERS:
        _, plugin = REGISTRY.build(plugin_type, {})
        kept = [
            [r.id for r in plugin.filter(req, list(replicas))]  # type: ignore[union-attr]
            for req in (first, second)
        ]
        assert kept[0] == kept[1], plugin_type
