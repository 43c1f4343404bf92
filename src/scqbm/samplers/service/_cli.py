"""``scqbm serve-sampler``: command-line options and entry point of the sampling service."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys

from .._wire import TOKEN_ENV
from ._limits import WORKER_KINDS, ServiceLimits

_DEFAULTS = ServiceLimits()

_INSTALL_HINT = "pip install 'scqbm[service]'"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``scqbm serve-sampler`` to ``parser``."""
    parser.description = (
        "Serve one sampler backend over HTTP for the 'remote' sampler: POST /v1/sample, "
        "GET /v1/info (both with 'Authorization: Bearer TOKEN'), GET /v1/health."
    )
    parser.epilog = (
        "Limits: a request over --max-spins, --max-reads, --max-payload-mb or --max-work "
        "(units x reads x sweeps per read) is refused with 413 before sampling; one that "
        "does not finish within --deadline seconds (queue and sampling) gets 503 "
        "deadline_exceeded; with --max-queue requests in progress the next gets 429 and "
        "Retry-After. Requests are sampled by --workers workers in fair chunks (each in a "
        "child process of its own by default, see --worker-kind), plus one "
        "express thread for small requests (about 0.1 s of work: they start at once even "
        "when big ones keep every worker busy), and work whose client has "
        "disconnected is stopped. Connections: at most --max-connections (never more than "
        "the file limit, ulimit -n, minus the descriptors in use at startup plus 64, at least "
        "64; at the cap the oldest idle connection is "
        "closed), --header-timeout seconds to send a request head, --body-timeout for the "
        "body (408), --keep-alive seconds between requests. Malformed requests get a 4xx "
        'with {"error": {"code", "message"}}.'
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
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
    d = _DEFAULTS
    limit = parser.add_argument_group("limits (defaults in brackets)")
    limit.add_argument(
        "--max-spins", type=int, default=d.max_spins, help="Most units per problem [%(default)s]."
    )
    limit.add_argument(
        "--max-reads", type=int, default=d.max_reads, help="Most reads per request [%(default)s]."
    )
    limit.add_argument(
        "--max-payload-mb",
        type=float,
        default=d.max_payload_bytes / 2**20,
        help="Largest request body in MiB [%(default)s].",
    )
    limit.add_argument(
        "--max-work",
        type=int,
        default=d.max_work,
        help="Most spin updates (units x reads x sweeps per read) per request [%(default)s].",
    )
    limit.add_argument(
        "--deadline",
        type=float,
        default=d.deadline_seconds,
        help="Seconds a request may take in the service, queue included [%(default)s].",
    )
    limit.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="Sampling workers, plus one express thread for small requests [%(default)s].",
    )
    limit.add_argument(
        "--worker-kind",
        choices=WORKER_KINDS,
        default=d.worker_kind,
        help=(
            "Where workers sample: 'processes' (one child process each; small requests do "
            "not share the service's interpreter with big ones), 'threads', or 'auto': "
            "processes for built-in backends without persistent chains on the CPU "
            "[%(default)s]."
        ),
    )
    limit.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="Requests in progress before 429 [%(default)s].",
    )
    limit.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="Open connections (capped by ulimit -n minus the descriptors in use + 64) "
        "[%(default)s].",
    )
    limit.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help="Seconds to send a request head [%(default)s].",
    )
    limit.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help="Seconds to send a request body [%(default)s].",
    )
    limit.add_argument(
        "--keep-alive",
        type=float,
        default=d.keep_alive_timeout,
        help="Seconds an idle connection stays open between requests [%(default)s].",
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
        from ._app import create_app
        from ._server import make_server
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
            max_work=args.max_work,
            deadline_seconds=args.deadline,
            workers=args.workers,
            worker_kind=args.worker_kind,
            max_queue=args.max_queue,
            max_connections=args.max_connections,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            keep_alive_timeout=args.keep_alive,
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
    try:
        app.state.pool.start()  # with worker_kind="auto", threads if processes cannot start
    except Exception as err:  # a child that cannot build the backend fails at startup
        print(f"scqbm serve-sampler: starting the worker processes failed: {err}", file=sys.stderr)
        return 2
    auth = "token required" if token else "NO authentication"
    print(
        f"scqbm serve-sampler: backend {args.backend!r} on {scheme}://{args.host}:{args.port} "
        f"({auth}; limits: {limits.max_spins} spins, {limits.max_reads} reads, "
        f"{limits.max_payload_bytes} bytes, {limits.max_work} spin updates, "
        f"{limits.deadline_seconds:g} s; {limits.workers} workers "
        f"({app.state.pool.worker_kind}), "
        f"queue {limits.max_queue}, "
        f"{limits.connection_cap()} connections)",
        flush=True,
    )
    server = make_server(
        app,
        limits,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    # uvicorn re-raises SIGTERM after its shutdown: as SystemExit here, so that the pool
    # (and its worker processes) is closed instead of the process dying around it.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run()
    finally:
        app.state.pool.close()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)
