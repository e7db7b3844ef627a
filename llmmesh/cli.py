"""`python -m llmmesh.cli generate "prompt"`: stream an answer through the gateway's gRPC API.

Instruct models are chatted with by default (the prompt becomes one user message, rendered
with the model's chat template by the gateway, as the OpenAI chat endpoint does); `--raw` sends
the prompt as a raw completion. Text goes to stdout; notes and the summary line go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import grpc

from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"

_FINISH_WORDS = {
    pb.FINISH_REASON_STOP: "stop (end of sequence or stop string)",
    pb.FINISH_REASON_LENGTH: "length (max tokens reached)",
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
}


def finish_words(reason: pb.FinishReason.ValueType) -> str:
    """A finish reason in words; unknown values (a newer gateway) by number."""
    words = _FINISH_WORDS.get(reason)
    return f"unknown finish reason {int(reason)}" if words is None else words


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _pick_model(
    stub: pb_grpc.GatewayServiceAsyncStub, wanted: str, rpc_timeout_s: float
) -> pb.ModelInfo | None:
    """The requested model's ModelInfo (the first served model when none is named); None when
    the gateway serves no model. A named model the gateway does not list is sent as named (the
    gateway answers NOT_FOUND), assumed to chat."""
    models = (await stub.ListModels(pb.ListModelsRequest(), timeout=rpc_timeout_s)).models
    if not wanted:
        return models[0] if models else None
    for m in models:
        if m.name == wanted:
            return m
    return pb.ModelInfo(name=wanted, supports_chat=True)


def _summary(
    c: pb.GenerationComplete, *, chat: bool, can_chat: bool, printed_text: bool, max_tokens: int
) -> tuple[str, str | None]:
    """The summary line and, for an empty answer, a hint."""
    u, t = c.usage, c.timings
    parts = [
        f"replica {c.replica_id or 'unknown'}",
        "chat" if chat else "raw completion",
        f"{u.prompt_tokens} prompt tokens ({u.cached_prompt_tokens} cached)",
    ]
    hint = None
    if u.completion_tokens == 0:
        parts.append("no tokens generated")
        if c.finish_reason == pb.FINISH_REASON_STOP:
            if chat:
                hint = "the model ended its answer at once; --raw sends a raw completion instead"
            elif can_chat:
                hint = (
                    "the model ended the raw completion at once (instruct models expect chat "
                    "messages): run without --raw to chat"
                )
            else:
                hint = "the model ended the raw completion at once; try another prompt"
    else:
        tokens = f"{u.completion_tokens} completion tokens"
        if not printed_text:
            tokens += " (no text: they decode to nothing)"
        parts += [tokens, f"TTFT {t.time_to_first_token_ms:.1f} ms"]
    parts.append(f"total {t.total_ms:.1f} ms")
    finish = finish_words(c.finish_reason)
    if c.finish_reason == pb.FINISH_REASON_LENGTH:
        finish = f"length (max tokens reached: --max-tokens {max_tokens})"
    parts.append(f"finish: {finish}")
    return "[" + ", ".join(parts) + "]", hint


async def generate(args: argparse.Namespace) -> int:
    """Stream one answer; 0 on success, 1 on an RPC error or an empty gateway."""
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        try:
            info = await _pick_model(stub, args.model, min(args.timeout, 10.0))
        except grpc.aio.AioRpcError as err:
            _err(f"error: ListModels: {err.code().name}: {err.details()}")
            return 1
        if info is None:
            _err("error: the gateway serves no model")
            return 1
        chat = not args.raw
        if chat and not info.supports_chat:
            chat = False
            ignored = " (--system ignored)" if args.system is not None else ""
            _err(
                f"note: model {info.name!r} has no chat template; sending a raw completion{ignored}"
            )
        sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        if args.seed is not None:
            sampling.seed = args.seed
        request = pb.GenerateRequest(model=info.name, sampling=sampling, request_id=args.request_id)
        if chat:
            if args.system is not None:
                request.messages.messages.add(role="system", content=args.system)
            request.messages.messages.add(role="user", content=args.prompt)
        else:
            request.text = args.prompt
        if args.resume_from is not None:
            request.resume_from = args.resume_from
        text_end = ""
        try:
            async for msg in stub.Generate(request, timeout=args.timeout):
                if msg.HasField("delta"):
                    if msg.delta.text:
                        sys.stdout.write(msg.delta.text)
                        sys.stdout.flush()
                        text_end = msg.delta.text
                elif msg.HasField("complete"):
                    if text_end and not text_end.endswith("\n"):
                        sys.stdout.write("\n")
                        sys.stdout.flush()
                    line, hint = _summary(
                        msg.complete,
                        chat=chat,
                        can_chat=info.supports_chat,
                        printed_text=bool(text_end),
                        max_tokens=args.max_tokens,
                    )
                    if hint is not None:
                        _err(f"hint: {hint}")
                    _err(line)
                    return 0
        except grpc.aio.AioRpcError as err:
            if text_end and not text_end.endswith("\n"):
                sys.stdout.write("\n")
                sys.stdout.flush()
            _err(f"error: {err.code().name}: {err.details()}")
            return 1
    _err("error: the stream ended without a completion message")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmmesh",
        description=(
            "Client for a running llmmesh gateway (gRPC API llmmesh.gateway.v1): "
            "`make run` starts a local mesh, `make generate` calls this."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser(
        "generate",
        help="Stream an answer to a prompt through the gateway.",
        description=(
            "Stream an answer through the gateway. Models with a chat template (instruct "
            "models) are chatted with by default: the prompt is one user message, rendered with "
            "the model's chat template. --raw sends it as a raw completion instead. The text "
            "goes to stdout; the summary (replica, tokens, TTFT, finish reason) to stderr."
        ),
    )
    gen.add_argument("prompt", help="The prompt: the user message, or the text to continue.")
    gen.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"Gateway gRPC address, host:port (default {DEFAULT_ADDRESS}).",
    )
    gen.add_argument(
        "--model",
        default="",
        metavar="NAME",
        help="Served model name (default: the first model the gateway lists).",
    )
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument(
        "--raw",
        action="store_true",
        help=(
            "Raw completion: send the prompt as text to continue, without the chat template "
            "(the default for models without one)."
        ),
    )
    mode.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help=(
            "System message before the prompt, in chat mode "
            "(default: none, so the chat template's own default applies)."
        ),
    )
    gen.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        metavar="N",
        help="Completion token limit (default 64).",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="Sampling temperature in [0, 2]; 0 is greedy (default 0).",
    )
    gen.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="Sampling seed: the same seed, prompt and parameters give the same tokens.",
    )
    gen.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="Deadline for the generation in seconds (default 120).",
    )
    gen.add_argument(
        "--request-id",
        default="",
        metavar="ID",
        help="Idempotency key: the same id and prompt re-attach to the same generation.",
    )
    gen.add_argument(
        "--resume-from",
        type=int,
        default=None,
        metavar="N",
        help="With --request-id: continue after this many completion tokens.",
    )
    return parser


async def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (sys.argv[1:] when None) and run the command; the exit code."""
    args = build_parser().parse_args(argv)
    return await generate(args)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(argv))


if __name__ == "__main__":
    sys.exit(main())
