"""``scqbm serve-sampler``: command-line options and entry point of the sampling service."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys

from ._protocol import TOKEN_ENV

_INSTALL_HINT = "pip install 'scqbm[service]'"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``scqbm serve-sampler`` to ``parser``."""
    parser.description = (
        "Serve one sampler backend over HTTP for the 'remote' sampler: POST /v1/sample, "
        "GET /v1/info (both with 'Authorization: Bearer TOKEN'), GET /v1/health."
    )
    parser.add_argument("--backend", default="gibbs", help="Registered sampler backend.")
    parser.add_argument(
        "--backend-kwargs", type=json.loads, default=None, help="JSON dict for the backend."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="Interface to bind (default: loopback only)."
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--token",
        help=f"Shared token (default: ${TOKEN_ENV}; the environment keeps it out of `ps`).",
    )
    parser.add_argument(
        "--allow-no-token", action="store_true", help="Serve without authentication."
    )
    parser.add_argument("--max-spins", type=int, default=2048, help="Most units per problem.")
    parser.add_argument("--max-reads", type=int, default=10_000, help="Most reads per request.")
    parser.add_argument(
        "--max-payload-mb", type=float, default=64.0, help="Largest request body in MiB."
    )
    parser.add_argument(
        "--device", default="cpu", help="Torch device of the backend, e.g. cuda (default: cpu)."
    )
    parser.add_argument("--ssl-certfile", help="TLS certificate (serve HTTPS).")
    parser.add_argument("--ssl-keyfile", help="TLS private key.")
    parser.add_argument("--log-level", default="info")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    """Run the sampling service until interrupted; 2 on a configuration error."""
    try:
        import uvicorn

        from ._app import ServiceLimits, create_app
    except ImportError as err:
        print(
            f"scqbm serve-sampler needs FastAPI and uvicorn ({err}): {_INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    token = args.token or os.environ.get(TOKEN_ENV)
    try:
        limits = ServiceLimits(
            max_spins=args.max_spins,
            max_reads=args.max_reads,
            max_payload_bytes=int(args.max_payload_mb * 2**20),
        )
        app = create_app(
            args.backend,
            args.backend_kwargs,
            token=token,
            limits=limits,
            allow_no_token=args.allow_no_token,
            device=args.device,
        )
    except (ValueError, TypeError, ImportError, RuntimeError) as err:
        print(f"scqbm serve-sampler: {err}", file=sys.stderr)
        return 2
    scheme = "https" if args.ssl_certfile else "http"
    if token and scheme == "http" and not _is_loopback(args.host):
        print(
            "scqbm serve-sampler: warning: serving plain HTTP beyond loopback sends the token "
            "in clear text; use --ssl-certfile/--ssl-keyfile or a TLS proxy.",
            file=sys.stderr,
        )
    auth = "token required" if token else "NO authentication"
    print(
        f"scqbm serve-sampler: backend {args.backend!r} on {scheme}://{args.host}:{args.port} "
        f"({auth}; limits: {limits.max_spins} spins, {limits.max_reads} reads, "
        f"{limits.max_payload_bytes} bytes)",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0
