"""``loka serve``: the HTTP server (OpenAI-compatible completions, the artifacts API, the workbench)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys

from ..errors import ConfigError, OutputError
from .common import add_model

NEEDS = "loka serve needs FastAPI and uvicorn: pip install 'loka[serve]'"


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: a free one), or one line saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address this machine can bind ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OutputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError(NEEDS) from None
    from ..serve.app import create_app

    if args.max_tokens_limit < 1:
        raise ConfigError(f"--max-tokens-limit must be a positive integer, got {args.max_tokens_limit}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    token = args.token or os.environ.get("LOKA_SERVE_TOKEN") or secrets.token_urlsafe(24)
    sock = _bind(args.host, args.port)  # before loading: a taken port fails at once
    try:
        app = create_app(
            args.model,
            store=args.store,
            token=token,
            max_tokens_limit=args.max_tokens_limit,
            device=args.device,
        )
        port = sock.getsockname()[1]
        shown = args.host if ":" not in args.host else f"[{args.host}]"
        if args.host in ("0.0.0.0", "::"):
            shown = "127.0.0.1"
        url = f"http://{shown}:{port}"
        engine = app.state.engine
        print(f"loka serve: {engine.handle.name} at {url} (artifacts in {engine.store.root})")
        print(f"token: {token}")
        print(f"workbench: {url}/#token={token}")
        if not _is_loopback(args.host):
            print(
                f"warning: listening on {args.host}, not only this machine: anyone who can reach it may generate, "
                "and the token guards the rest; the connection is not encrypted",
                file=sys.stderr,
            )
        sys.stdout.flush()
        config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", access_log=args.verbose)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def register(sub, methods, forgetters) -> None:
    """Add ``loka serve`` to the ``loka`` parser."""
    from ..models.catalog import DEFAULT_MODEL

    s = sub.add_parser(
        "serve",
        help="serve a model over HTTP: OpenAI-compatible completions, per-request artifact stacks, the artifacts "
        "API and the workbench page",
        description="Serve one model over HTTP (docs/serve.md). Prints the token that guards the endpoints "
        "that change something, and the workbench URL.",
    )
    add_model(s, f"model to serve (default {DEFAULT_MODEL})")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    s.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)"
    )
    s.add_argument(
        "--store",
        metavar="DIR",
        help="folder of the server's artifacts (default $LOKA_HOME/serve/artifacts; created if missing)",
    )
    s.add_argument(
        "--token",
        help="bearer token for the endpoints that change something (default $LOKA_SERVE_TOKEN, else a random one, "
        "printed at start)",
    )
    s.add_argument(
        "--max-tokens-limit",
        type=int,
        default=512,
        metavar="N",
        help="the most tokens one request may generate (default 512)",
    )
    s.set_defaults(fn=cmd_serve)
