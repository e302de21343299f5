"""`quartet serve ROLE`: run one model role as a gRPC service until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

SERVE_HELP = (
    "Run one model role as a gRPC service until SIGTERM/SIGINT.\n\n"
    "ROLE is a built-in role (generator, reward, reference, value) or the dotted module path of a "
    "custom role: a module exposing NAME, Options (pydantic) and create(ctx, options), imported from "
    "the current directory or installed packages (e.g. `quartet serve my_pkg.my_reward`).\n\n"
    "Every service speaks grpc.health.v1 (NOT_SERVING until the model is loaded), server reflection, "
    "and exposes Prometheus metrics on --metrics-port. On SIGTERM it reports NOT_SERVING, stops "
    "accepting calls, lets in-flight calls finish within --grace seconds, and exits 0.\n\n"
    "Configuration, lowest precedence first: defaults < --config FILE (YAML: role, model, server, "
    "checkpoint_dir, ready_file, options) < environment (QUARTET_*) < flags < --set key=value "
    "(repeatable; dotted keys such as server.port=5000, model.path=./ckpt, options.kind=rule; values "
    "are YAML, so 5000 is a number and true a boolean). Role options are only set through the file "
    "or --set."
)

_MODEL = "Model"
_NET = "Network"
_AUTH = "Auth and TLS"
_RUN = "Runtime"


def setup_logging(level: str) -> None:
    """Log lines on stderr at `level`: rich on a terminal, plain one-liners otherwise (containers)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _opt(*names: str, envvar: str | None = None, panel: str = _RUN, help: str = "", **kw: Any) -> Any:
    return typer.Option(*names, envvar=envvar, help=help, rich_help_panel=panel, show_default=False, **kw)


def serve(
    role: Annotated[str | None, typer.Argument(
        help="generator | reward | reference | value | a.dotted.module (default: `role` from --config).",
        show_default=False)] = None,
    model: Annotated[str | None, _opt("--model", envvar="QUARTET_MODEL", panel=_MODEL,
                                      help="Local checkpoint directory (model.path).")] = None,
    dtype: Annotated[str | None, _opt("--dtype", envvar="QUARTET_DTYPE", panel=_MODEL,
                                      help="auto | float32 | bfloat16 | float16 (model.dtype).")] = None,
    device: Annotated[str | None, _opt("--device", envvar="QUARTET_DEVICE", panel=_MODEL,
                                       help="auto | cpu | cuda | cuda:N (model.device).")] = None,
    host: Annotated[str | None, _opt("--host", envvar="QUARTET_HOST", panel=_NET,
                                     help="Bind address (default 127.0.0.1) (server.host).")] = None,
    port: Annotated[int | None, _opt("--port", envvar="QUARTET_PORT", panel=_NET,
                                     help="gRPC port; 0 = any free port (default) (server.port).")] = None,
    metrics_port: Annotated[int | None, _opt("--metrics-port", envvar="QUARTET_METRICS_PORT", panel=_NET,
                                             help="Prometheus port; 0 = free port (default), -1 = off.")] = None,
    max_message_bytes: Annotated[int | None, _opt("--max-message-bytes", envvar="QUARTET_MAX_MESSAGE_BYTES",
                                                  panel=_NET, help="gRPC message size limit (default 256 MiB).")] = None,
    token: Annotated[str | None, _opt("--token", envvar="QUARTET_TOKEN", panel=_AUTH,
                                      help="Call-scope bearer token (prefer the env var or --token-file).")] = None,
    token_file: Annotated[Path | None, _opt("--token-file", envvar="QUARTET_TOKEN_FILE", panel=_AUTH,
                                            help="File holding the call token.")] = None,
    admin_token: Annotated[str | None, _opt("--admin-token", envvar="QUARTET_ADMIN_TOKEN", panel=_AUTH,
                                            help="Admin-scope token (UpdateWeights, TrainStep, Save, Load).")] = None,
    admin_token_file: Annotated[Path | None, _opt("--admin-token-file", envvar="QUARTET_ADMIN_TOKEN_FILE",
                                                  panel=_AUTH, help="File holding the admin token.")] = None,
    tls_cert: Annotated[Path | None, _opt("--tls-cert", envvar="QUARTET_TLS_CERT", panel=_AUTH,
                                          help="PEM server certificate (TLS on, with --tls-key).")] = None,
    tls_key: Annotated[Path | None, _opt("--tls-key", envvar="QUARTET_TLS_KEY", panel=_AUTH,
                                         help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[Path | None, _opt("--tls-client-ca", envvar="QUARTET_TLS_CLIENT_CA", panel=_AUTH,
                                               help="PEM CA: require client certificates it signed (mTLS).")] = None,
    workers: Annotated[int | None, _opt("--workers", envvar="QUARTET_WORKERS",
                                        help="Server threads = concurrent RPCs (default 32).")] = None,
    grace: Annotated[float | None, _opt("--grace", envvar="QUARTET_GRACE",
                                        help="Seconds in-flight calls may run after SIGTERM (default 30).")] = None,
    ready_file: Annotated[Path | None, _opt("--ready-file", envvar="QUARTET_READY_FILE",
                                            help="Write {address, port, metrics_port, pid} JSON here once SERVING.")] = None,
    checkpoint_dir: Annotated[Path | None, _opt("--checkpoint-dir", envvar="QUARTET_CHECKPOINT_DIR",
                                                help="Where Save/Load may write/read (value role).")] = None,
    config: Annotated[Path | None, _opt("--config", "-c", envvar="QUARTET_CONFIG",
                                        help="YAML service config file.")] = None,
    set_: Annotated[list[str] | None, _opt("--set", help="key=value override, repeatable (highest precedence).")] = None,
    log_level: Annotated[str, _opt("--log-level", envvar="QUARTET_LOG_LEVEL", help="DEBUG | INFO | WARNING.")] = "INFO",
) -> None:
    setup_logging(log_level)
    from services.common.config import ConfigError, load_service_config
    from services.common.server import BindError, serve_role

    given = {
        "role": role,
        "model": {"path": model, "dtype": dtype, "device": device},
        "server": {
            "host": host, "port": port, "metrics_port": metrics_port, "max_message_bytes": max_message_bytes,
            "token": token, "token_file": token_file, "admin_token": admin_token,
            "admin_token_file": admin_token_file, "tls_cert": tls_cert, "tls_key": tls_key,
            "tls_client_ca": tls_client_ca, "workers": workers, "grace_seconds": grace,
        },
        "ready_file": ready_file, "checkpoint_dir": checkpoint_dir,
    }
    # Custom roles given as module paths are looked up from the working directory too, like
    # `python -m` would (the console script's sys.path starts at its own bin directory).
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        cfg = load_service_config(file=config, given=_stringify_paths(given), sets=set_ or ())
        if cfg.role is None:
            raise ConfigError("role: give ROLE on the command line or `role:` in the config file")
        code = serve_role(
            cfg.role, model=cfg.model, options=cfg.options, server=cfg.server,
            checkpoint_dir=cfg.checkpoint_dir, ready_file=cfg.ready_file,
        )
    except ConfigError as e:
        _fail(f"configuration error:\n{e}", 2)
    except BindError as e:
        _fail(str(e), 1)
    _exit_process(code)


def _exit_process(code: int) -> None:
    """Exit without joining threads: a handler still stuck after the grace period (grpc cancelled
    its call, but Python cannot interrupt the thread) must not keep the process alive past the drain."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stringify_paths(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _stringify_paths(v) if isinstance(v, dict) else (str(v) if isinstance(v, Path) else v)
            for k, v in tree.items()}


def _fail(message: str, code: int) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)
