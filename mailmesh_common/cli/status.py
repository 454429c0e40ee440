"""`mailmesh status`: the health of every component of a running mesh.

Services answer the standard gRPC health check (grpc.health.v1, service ""); NATS is healthy
when it accepts a connection and JetStream answers account info. Addresses come from
`DIR/endpoints.json` (written by `mailmesh up`) or, without it, from the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mailmesh_common.config import Settings, load_settings
from mailmesh_common.natsserver import jetstream_ready, tcp_open

SERVICES = ("svc_mailbox", "svc_search", "svc_send", "svc_ingest", "svc_gateway")
NATS = "nats"
COMPONENTS = (*SERVICES, NATS)

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
UNREACHABLE = "UNREACHABLE"

ENDPOINTS_FILE = "endpoints.json"


def service_key(component: str) -> str:
    """`svc_mailbox` -> `mailbox` (the settings' name for it)."""
    return component.removeprefix("svc_")


def component_addresses(settings: Settings) -> dict[str, str]:
    """Where each component listens: gRPC host:port for services, the NATS URL for nats."""
    out = {name: f"{settings.host}:{getattr(settings, service_key(name) + '_port')}" for name in SERVICES}
    out[NATS] = f"nats://{settings.host}:{settings.nats_port}"
    return out


def read_endpoints(data_dir: Path) -> dict[str, str] | None:
    """The addresses `mailmesh up` recorded in the data dir, if any."""
    try:
        data = json.loads((data_dir / ENDPOINTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    found = {k: v for k, v in data.items() if k in COMPONENTS and isinstance(v, str)}
    return found if len(found) == len(COMPONENTS) else None


async def grpc_health(addr: str, timeout_s: float = 2.0) -> str:
    """SERVING, NOT_SERVING (or another health status name), or UNREACHABLE."""
    channel = grpc.aio.insecure_channel(addr)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return UNREACHABLE
        return NOT_SERVING
    finally:
        await channel.close()


async def nats_health(url: str, timeout_s: float = 2.0) -> str:
    """SERVING when JetStream answers, NOT_SERVING when only TCP does, UNREACHABLE otherwise."""
    if not await tcp_open(url, timeout_s):
        return UNREACHABLE
    return SERVING if await jetstream_ready(url, timeout_s) else NOT_SERVING


async def check_all(addresses: dict[str, str], timeout_s: float = 2.0) -> dict[str, str]:
    names = [n for n in COMPONENTS if n in addresses]
    results = await asyncio.gather(*(
        nats_health(addresses[n], timeout_s) if n == NATS else grpc_health(addresses[n], timeout_s)
        for n in names))
    return dict(zip(names, results, strict=True))


def run_status(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    settings = load_settings(args.config, data_dir=data_dir)
    addresses = read_endpoints(settings.data_dir) or component_addresses(settings)
    results = asyncio.run(check_all(addresses, args.timeout))
    ok = all(status == SERVING for status in results.values())
    if args.json:
        doc: dict[str, Any] = {
            "ok": ok,
            "components": {n: {"address": addresses[n], "status": s} for n, s in results.items()},
        }
        print(json.dumps(doc, indent=2))
    else:
        width = max(len(n) for n in results)
        awidth = max(len(addresses[n]) for n in results)
        for name, status in results.items():
            print(f"{name:<{width}}  {addresses[name]:<{awidth}}  {status}")
    sys.stdout.flush()
    return 0 if ok else 1


def add_status_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="health of every component of a running mesh",
                       description="Checks every component; exits 0 when all are SERVING, 1 otherwise.")
    p.add_argument("--data-dir", help="the mesh's data directory (default: settings, ./data)")
    p.add_argument("--config", help="TOML settings file (default: $MAILMESH_CONFIG)")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per check (default 2)")
    p.set_defaults(func=run_status)
