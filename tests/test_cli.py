"""`python -m llmmesh.cli` against a real gateway gRPC server (production servicer over a core
with the fake admission and engine of tests/gateway): chat by default, --raw, the fallback for a
model without a chat template, the summary line, empty answers, errors and --help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmmesh import cli
from llmmesh.common.errors import Unavailable
from services.gateway.models import ServedModel
from services.gateway.triton_stream import EngineChunk
from tests.gateway.conftest import chunk
from tests.gateway.grpc_front import BARE_MODEL, BLOCK_SIZE, chat_and_bare_models, grpc_gateway

PROMPT = "Explain in two sentences why the sky is blue."


@pytest.fixture(scope="module")
def models(tokenizer_path: Path) -> tuple[ServedModel, ServedModel]:
    return chat_and_bare_models(tokenizer_path)


def chat_ids(model: ServedModel, *messages: tuple[str, str]) -> list[int]:
    assert model.chat_template is not None
    return model.encode(
        model.chat_template.render([{"role": r, "content": c} for r, c in messages])
    )


def answer(model: ServedModel, text: str, cached_blocks: int | None = None) -> list[EngineChunk]:
    """The engine's chunks for `text`, then the end-of-sequence token."""
    return [
        EngineChunk(model.encode(text), False, cached_blocks),
        chunk(model.end_id, final=True),
    ]


async def test_chat_by_default(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    chat, _ = models
    async with grpc_gateway(models, [answer(chat, "Rayleigh scattering.", 2)]) as front:
        rc = await cli.run(["generate", "--address", front.address, PROMPT])
    assert rc == 0
    assert list(front.engine.requests[0].input_ids) == chat_ids(chat, ("user", PROMPT))
    out, err = capsys.readouterr()
    assert out == "Rayleigh scattering.\n"
    summary = err.splitlines()[-1]
    prompt_tokens = len(chat_ids(chat, ("user", PROMPT)))
    assert summary.startswith("[replica r1, chat, ")
    assert f"{prompt_tokens} prompt tokens ({2 * BLOCK_SIZE} cached)" in summary
    assert f"{len(chat.encode('Rayleigh scattering.'))} completion tokens" in summary
    assert re.search(r"TTFT \d+\.\d ms, total \d+\.\d ms", summary)
    assert summary.endswith("finish: stop (end of sequence or stop string)]")


async def test_system_message_comes_first(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    chat, _ = models
    async with grpc_gateway(models, [answer(chat, "Blue.")]) as front:
        rc = await cli.run(
            ["generate", "--address", front.address, "--system", "Be brief.", PROMPT]
        )
    assert rc == 0
    assert list(front.engine.requests[0].input_ids) == chat_ids(
        chat, ("system", "Be brief."), ("user", PROMPT)
    )


async def test_raw_sends_the_prompt_text(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    chat, _ = models
    async with grpc_gateway(models, [answer(chat, " Paris.")]) as front:
        rc = await cli.run(
            ["generate", "--address", front.address, "--raw", "The capital of France is"]
        )
    assert rc == 0
    assert list(front.engine.requests[0].input_ids) == chat.encode("The capital of France is")
    out, err = capsys.readouterr()
    assert out == " Paris.\n"
    assert err.splitlines()[-1].startswith("[replica r1, raw completion, ")


async def test_model_without_chat_template_falls_back_to_raw_with_a_note(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    chat, _ = models
    async with grpc_gateway(models, [answer(chat, " Paris.")]) as front:
        rc = await cli.run(
            ["generate", "--address", front.address, "--model", BARE_MODEL, "--system", "S", "Hi"]
        )
    assert rc == 0
    assert list(front.engine.requests[0].input_ids) == chat.encode("Hi")
    err = capsys.readouterr().err
    assert (
        "note: model 'bare' has no chat template; sending a raw completion (--system ignored)"
        in err
    )


async def test_empty_raw_answer_says_so_and_hints_at_chat(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    chat, _ = models
    # What SmolLM2-135M-Instruct does with a raw question: end of sequence at once.
    async with grpc_gateway(models, [[chunk(chat.end_id, final=True)]]) as front:
        rc = await cli.run(["generate", "--address", front.address, "--raw", PROMPT])
    assert rc == 0
    out, err = capsys.readouterr()
    assert out == ""
    *_, hint, summary = err.splitlines()
    assert "no tokens generated" in summary
    assert "TTFT" not in summary
    assert "completion tokens" not in summary
    assert summary.endswith("finish: stop (end of sequence or stop string)]")
    assert hint.startswith("hint: ")
    assert "run without --raw to chat" in hint


async def test_empty_chat_answer_hints_at_raw(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    chat, _ = models
    async with grpc_gateway(models, [[chunk(chat.end_id, final=True)]]) as front:
        rc = await cli.run(["generate", "--address", front.address, PROMPT])
    assert rc == 0
    *_, hint, summary = capsys.readouterr().err.splitlines()
    assert "no tokens generated" in summary
    assert "--raw" in hint


async def test_length_finish_names_the_limit(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    chat, _ = models
    ids = chat.encode(" one two three four five")
    async with grpc_gateway(models, [[chunk(*ids)]]) as front:
        rc = await cli.run(["generate", "--address", front.address, "--max-tokens", "2", "x"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert out == chat.decode(ids[:2]) + "\n"
    summary = err.splitlines()[-1]
    assert "2 completion tokens" in summary
    assert summary.endswith("finish: length (max tokens reached: --max-tokens 2)]")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "nope", "hi"], "error: NOT_FOUND: model: unknown model 'nope'"),
        (["--max-tokens", "0", "hi"], "error: INVALID_ARGUMENT: sampling.max_tokens: "),
    ],
)
async def test_rpc_errors_exit_non_zero_with_code_and_details(
    models: tuple[ServedModel, ServedModel],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    expected: str,
) -> None:
    async with grpc_gateway(models) as front:
        rc = await cli.run(["generate", "--address", front.address, *argv])
    assert rc == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1].startswith(expected)


async def test_admission_failure_exits_non_zero(
    models: tuple[ServedModel, ServedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    async with grpc_gateway(models, reject=Unavailable("no ready replica")) as front:
        rc = await cli.run(["generate", "--address", front.address, "hi"])
    assert rc == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: UNAVAILABLE: no ready replica"


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def option_help(text: str) -> dict[str, str]:
    """Each `--option` of an argparse help text → its help (which may start on the next line)."""
    options: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)(?: [A-Z:_]+)?(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1)
            options[current] = m.group(2) or ""
        elif current is not None and line.startswith("   ") and line.strip():
            options[current] = (options[current] + " " + line.strip()).strip()
        else:
            current = None
    return options


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    top = help_text(["--help"], capsys)
    assert "Client for a running llmmesh gateway" in top
    assert "generate" in top
    text = help_text(["generate", "--help"], capsys)
    documented = option_help(text)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    gen = sub.choices["generate"]  # type: ignore[index]
    declared = {s for a in gen._actions for s in a.option_strings if s.startswith("--")}
    assert declared == set(documented)
    assert {"--raw", "--system", "--request-id", "--resume-from", "--max-tokens"} <= declared
    for option, help_ in documented.items():
        assert len(help_) > 10, f"{option} has no help text"
    assert all(a.help for a in gen._actions)
