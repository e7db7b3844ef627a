"""Reading the engine's gauges from a Triton metrics page: the values of the two TensorRT-LLM
families, whatever else the page holds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.common import engine_metrics
from llmmesh.common.engine_metrics import EngineSample, parse_engine_metrics
from llmmesh.common.metric_names import TRTLLM_KV_CACHE_BLOCK_METRICS, TRTLLM_REQUEST_METRICS

REQUESTS = """\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 8
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 64
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 8
"""
BLOCKS = """\
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.165
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 32
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 871
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 4407
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 5278
"""
# Other families, some named with a TRT-LLM family's name as their prefix.
OTHERS = """\
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="tensorrt_llm",version="1"} 1200
# HELP nv_trt_llm_request_metrics_extra A family whose name extends a read one
# TYPE nv_trt_llm_request_metrics_extra gauge
nv_trt_llm_request_metrics_extra{request_type="active"} 999
# HELP nv_trt_llm_kv_cache_block_metrics_total Another
# TYPE nv_trt_llm_kv_cache_block_metrics_total counter
nv_trt_llm_kv_cache_block_metrics_total{kv_cache_block_type="used"} 5
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-0"} 0.5
nv_pinned_memory_pool_used_bytes 0
"""
EXPECTED = EngineSample(8.0, 3.0, 871.0, 5278.0, 64.0, 4407.0)


@pytest.mark.parametrize(
    "page",
    [
        REQUESTS + BLOCKS,
        OTHERS + REQUESTS + OTHERS.replace("GPU-0", "GPU-1") + BLOCKS,
        BLOCKS + OTHERS + REQUESTS,
        (OTHERS + REQUESTS + BLOCKS).replace("\n", "\r\n"),
    ],
)
def test_the_two_families_are_read_whatever_else_the_page_holds(page: str) -> None:
    assert parse_engine_metrics(page) == EXPECTED


def test_samples_of_one_type_add_up_across_models() -> None:
    second = REQUESTS.replace('model="tensorrt_llm"', 'model="tensorrt_llm_2"').split("\n", 2)[2]
    sample = parse_engine_metrics(REQUESTS + second + BLOCKS)
    assert sample is not None
    assert (sample.active, sample.waiting, sample.max_batch) == (16.0, 6.0, 128.0)


@pytest.mark.parametrize(
    "page",
    [
        OTHERS,
        REQUESTS + OTHERS,  # no KV block family
        REQUESTS + BLOCKS.replace('"used"', '"in_use"'),  # a required gauge missing
        REQUESTS.replace("} 8\n", "} NaN\n") + BLOCKS,  # not finite
        "",
    ],
)
def test_a_page_without_every_required_gauge_gives_no_sample(page: str) -> None:
    assert parse_engine_metrics(page) is None


# -- the fast reading agrees with the library's ------------------------------------------------
_FAMILY_NAMES = (TRTLLM_REQUEST_METRICS, TRTLLM_KV_CACHE_BLOCK_METRICS)
_label_values = st.text(alphabet=st.sampled_from('ab ,={}"\\\n_1'), max_size=8)
_numbers = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e3", ".5", "1_0"]),
)


@st.composite
def _sample_lines(draw: st.DrawFn) -> str:
    family = draw(st.sampled_from(_FAMILY_NAMES))
    names: list[str] = draw(
        st.lists(
            st.sampled_from(["request_type", "kv_cache_block_type", "model", "__name__"]),
            max_size=3,
        )
    )
    braces: bool = draw(st.booleans())
    pairs = ",".join(
        f'{n}{draw(st.sampled_from(["", " "]))}="{draw(_label_values).replace(chr(10), "")}"'
        for n in names
    )
    labels = f"{{{pairs}{draw(st.sampled_from(['', ',']))}}}" if names or braces else ""
    stamp = draw(st.sampled_from(["", " 1712345678000"]))
    return f"{family}{labels} {draw(_numbers)}{stamp}"


@settings(max_examples=300, deadline=None)
@given(st.lists(_sample_lines(), max_size=6))
def test_the_fast_reading_equals_the_library_or_leaves_the_page_to_it(lines: list[str]) -> None:
    fast = engine_metrics._values_fast(lines)
    try:
        library = engine_metrics._values_library(lines)
    except ValueError:  # the library refuses the page: the fast reading must not accept it
        assert fast is None
        return
    if fast is not None:
        assert fast.keys() == library.keys()
        for key, value in fast.items():
            assert value == library[key] or (math.isnan(value) and math.isnan(library[key]))


def test_an_escaped_label_value_is_read_by_the_library() -> None:
    page = REQUESTS.replace('model="tensorrt_llm"', 'model="a\\"b"') + BLOCKS
    assert engine_metrics._values_fast(engine_metrics._family_lines(page)) is None
    assert parse_engine_metrics(page) == EXPECTED
