"""`python -m bench.hopfloor`: what one round trip to a Python grpc.aio server costs on this
machine, busy and after idle: the floor under every hop the mesh adds to a request.

A server process (uvloop and grpc.aio, as the services run) answers a unary call with its request
bytes, and echoes bytes on a plain TCP socket; this process calls it, pinned as bench-overhead
pins (client on the engines' CPU, server on the mesh's). Three ways, `--calls` each:
- back to back: the next call sent as the last answer arrives (a busy service);
- after idle: each call sent `--idle-ms` after the last answer (a service between requests:
  at 1 stream, the orchestrator idles between Admits, and each Admit is on the critical path of
  its request's first token);
- raw TCP after idle: the same wait, one small write and read over a TCP_NODELAY socket (the
  kernel's and the scheduler's share: waking two idle processes).
Per way: round-trip p50/p90, and the server's context switches per call (voluntary and not, all
its threads: gRPC's event-engine threads and the completion-queue poller hand each call on to
the event loop). `bench-overhead` runs it after its arms and prints it beside the 1-stream
target; it is no target itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from bench.overhead import announced, pct, pin, pinning
from bench.report import write_json
from llmmesh.common.process import tied_to_parent

METHOD = "/llmmesh.bench.HopFloor/Echo"
PAYLOAD = b"x" * 64


@dataclass
class Way:
    name: str
    calls: int
    p50_ms: float
    p90_ms: float
    server_switches_per_call: float


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of `pid` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if "ctxt_switches:" in line:  # voluntary_… and nonvoluntary_…
                        total += int(line.split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total


async def serve() -> None:
    """The server: prints {"grpc_port": p, "tcp_port": q}, then serves until killed."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "llmmesh.bench.HopFloor",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},  # bytes in, bytes out
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()

    tcp_server = await asyncio.start_server(tcp, "127.0.0.1", 0)
    tcp_port = tcp_server.sockets[0].getsockname()[1]
    print(json.dumps({"grpc_port": grpc_port, "tcp_port": tcp_port}), flush=True)
    await server.wait_for_termination()


async def measure(
    calls: int = 300, idle_ms: float = 5.0, cores: tuple[set[int], set[int]] | None = None
) -> list[Way]:
    """The three ways (see the module doc), client in this process; `cores`: (client CPUs,
    server CPUs), as `bench.overhead.pinning` gives; this process's affinity is restored."""
    mine = os.sched_getaffinity(0)
    proc = await asyncio.create_subprocess_exec(
        *tied_to_parent([sys.executable, "-m", "bench.hopfloor", "--serve"]),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        ports = json.loads(await announced(proc, "hop-floor server"))
        if cores is not None:
            pin([os.getpid()], cores[0])
            pin([proc.pid], cores[1])
        ways = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
            call = channel.unary_unary(METHOD, None, None)  # bytes in, bytes out
            for _ in range(50):  # connected, and the code paths warm
                await call(PAYLOAD)

            async def grpc_once() -> None:
                assert await call(PAYLOAD) == PAYLOAD

            ways.append(await _way("grpc.aio unary, back to back", grpc_once, calls, 0, proc.pid))
            ways.append(
                await _way(
                    f"grpc.aio unary, after {idle_ms:g} ms idle",
                    grpc_once,
                    calls,
                    idle_ms,
                    proc.pid,
                )
            )
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["tcp_port"])
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def tcp_once() -> None:
            writer.write(PAYLOAD)
            assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD

        ways.append(
            await _way(f"raw TCP, after {idle_ms:g} ms idle", tcp_once, calls, idle_ms, proc.pid)
        )
        writer.close()
        return ways
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.sched_setaffinity(0, mine)


async def _way(name: str, once: Any, calls: int, idle_ms: float, server_pid: int) -> Way:
    times = []
    switches0 = context_switches(server_pid)
    for _ in range(calls):
        if idle_ms:
            await asyncio.sleep(idle_ms / 1000)
        start = time.perf_counter()
        await once()
        times.append((time.perf_counter() - start) * 1000)
    switches = (context_switches(server_pid) - switches0) / calls
    return Way(name, calls, pct(times, 0.5), pct(times, 0.9), switches)


def print_ways(ways: list[Way]) -> None:
    print("\none round trip to a Python grpc.aio server (the floor under each hop the mesh adds)")
    print(f"{'way':<36} | {'p50 ms':>7} | {'p90 ms':>7} | server context switches/call")
    print("-" * 84)
    for w in ways:
        print(
            f"{w.name:<36} | {w.p50_ms:7.3f} | {w.p90_ms:7.3f} | {w.server_switches_per_call:.1f}"
        )


def as_json(ways: list[Way]) -> list[dict[str, Any]]:
    return [asdict(w) for w in ways]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--idle-ms", type=float, default=5.0)
    p.add_argument("--no-pin", action="store_true", help="Do not pin processes to CPUs.")
    p.add_argument("--output", default="hopfloor.json", help="JSON file name in bench-results/.")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(serve())
        return 0
    ways = uvloop.run(measure(args.calls, args.idle_ms, pinning(not args.no_pin)))
    print_ways(ways)
    print(f"\nwrote {write_json(args.output, {'args': vars(args), 'ways': as_json(ways)})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
