"""`python -m llmmesh.cli generate "prompt"`: stream a completion through the gateway's gRPC API."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc


async def generate(args: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        if not args.model:
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            if not models.models:
                print("the gateway serves no model", file=sys.stderr)
                return 1
            args.model = models.models[0].name
        sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        if args.seed is not None:
            sampling.seed = args.seed
        request = pb.GenerateRequest(
            model=args.model, text=args.prompt, sampling=sampling, request_id=args.request_id
        )
        if args.resume_from is not None:
            request.resume_from = args.resume_from
        try:
            async for msg in stub.Generate(request, timeout=args.timeout):
                if msg.HasField("delta"):
                    sys.stdout.write(msg.delta.text)
                    sys.stdout.flush()
                else:
                    c = msg.complete
                    print(
                        f"\n[{c.usage.prompt_tokens} prompt + {c.usage.completion_tokens} completion tokens, "
                        f"cached {c.usage.cached_prompt_tokens}, TTFT {c.timings.time_to_first_token_ms:.1f} ms, "
                        f"total {c.timings.total_ms:.1f} ms, replica {c.replica_id}, "
                        f"finish {pb.FinishReason.Name(c.finish_reason)}]",
                        file=sys.stderr,
                    )
        except grpc.aio.AioRpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="llmmesh")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="Stream a completion through the gateway.")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--model", default="")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.add_argument(
        "--request-id",
        default="",
        help="Idempotency key: the same id and prompt re-attach to the same generation.",
    )
    gen.add_argument(
        "--resume-from",
        type=int,
        default=None,
        help="With --request-id: continue after this many completion tokens.",
    )
    args = parser.parse_args()
    return asyncio.run(generate(args))


if __name__ == "__main__":
    sys.exit(main())
