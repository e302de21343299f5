"""The `serve` command shared by `quartet serve` and `python -m services`: flags built from the config.

Each flag in services.common.config.EXPOSED becomes a typer option whose help is the field's own
description, followed by its config key, environment variable and default, so no help text is
written twice. The command's signature is built here (typer reads `__signature__`), and its body
loads the config with the shared loader and serves the role until SIGTERM/SIGINT.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic.fields import FieldInfo

from services.common.config import EXPOSED, ConfigError, Exposed, ServiceConfig
from services.common.settings import model_at

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
    "or --set. Each option's help names its config key and environment variable."
)

_RUNTIME = "Runtime"


def silence_progress_bars() -> None:
    """Turn off Hugging Face's tqdm bars ("Loading weights", "Writing model shards") in this process and its children.

    They would be drawn into a service log, or through the orchestrator's progress bar, once per model load
    and checkpoint. The variable covers a transformers imported later and child processes; the call, one
    imported already.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


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


def field_at(path: str) -> FieldInfo:
    """The pydantic field of ServiceConfig at a dotted path, e.g. "server.port"."""
    *sections, name = path.split(".")
    model = model_at(ServiceConfig, sections)
    if model is None or name not in model.model_fields:
        raise KeyError(f"ServiceConfig has no field {path!r}")
    return model.model_fields[name]


def flag_help(exposed: Exposed) -> str:
    """The field's description, then where else it is set and its default."""
    field = field_at(exposed.path)
    default = "" if field.default is None else f"; default {field.default}"
    return f"{field.description} ({exposed.path}, ${exposed.env}{default})"


def _param(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _signature() -> inspect.Signature:
    role = field_at("role").description
    params = [
        inspect.Parameter("role", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            str | None, typer.Argument(help=f"{role} Default: `role` from --config.", show_default=False)]),
    ]
    for e in EXPOSED:
        option = typer.Option(e.flag, help=flag_help(e), rich_help_panel=e.panel, show_default=False)
        params.append(_param(e.path.replace(".", "__"), Annotated[field_at(e.path).annotation | None, option]))
    params += [
        _param("config", Annotated[Path | None, typer.Option(
            "--config", "-c", envvar="QUARTET_CONFIG", help="YAML service config file.", rich_help_panel=_RUNTIME)]),
        _param("set_", Annotated[list[str] | None, typer.Option(
            "--set", help="key=value override, repeatable (highest precedence).", rich_help_panel=_RUNTIME)]),
        _param("log_level", Annotated[str, typer.Option(
            "--log-level", envvar="QUARTET_LOG_LEVEL", help="DEBUG | INFO | WARNING.", rich_help_panel=_RUNTIME)],
            default="INFO"),
    ]
    return inspect.Signature(params)


def serve_command(exit_process: Callable[[int], None]) -> Callable[..., None]:
    """A function typer turns into the `serve` command; `exit_process(code)` ends the process after serving."""

    def serve(role: str | None = None, *, config: Path | None = None, set_: list[str] | None = None,
              log_level: str = "INFO", **flags: Any) -> None:
        setup_logging(log_level)
        silence_progress_bars()
        given = {"role": role, **{name.replace("__", "."): value for name, value in flags.items()}}
        exit_process(run(config=config, flags=given, sets=set_ or ()))

    serve.__signature__ = _signature()  # type: ignore[attr-defined]
    return serve


def run(*, config: Path | None, flags: dict[str, Any], sets: Iterable[str]) -> int:
    """Load the config (file < environment < flags < sets) and serve the role; the exit code.

    A config error exits 2 and a port that cannot be bound exits 1, each with a one-line message.
    """
    from services.common.config import load_service_config
    from services.common.server import BindError, serve_role

    # Custom roles given as module paths are looked up from the working directory too, like
    # `python -m` would (the console script's sys.path starts at its own bin directory).
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        cfg = load_service_config(file=config, flags=flags, sets=sets, environ=os.environ)
        if cfg.role is None:
            raise ConfigError("role: give ROLE on the command line or `role:` in the config file")
        return serve_role(
            cfg.role, model=cfg.model, options=cfg.options, server=cfg.server,
            checkpoint_dir=cfg.checkpoint_dir, ready_file=cfg.ready_file,
        )
    except ConfigError as e:
        _fail(f"configuration error:\n{e}", 2)
    except BindError as e:
        _fail(str(e), 1)


def exit_process(code: int) -> None:
    """Exit without joining threads: a handler still stuck after the grace period (grpc cancelled
    its call, but Python cannot interrupt the thread) must not keep the process alive past the drain."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail(message: str, code: int) -> NoReturn:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)
