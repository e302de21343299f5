"""The `quartet` command line (console script `quartet = cli.main:app`).

Each command lives in its own module and is registered here with one line, so adding one (train,
demo, eval, ...) is `app.command("train")(train.train)`. Command modules import heavy libraries
(torch, grpc servers) inside their functions, keeping `quartet --help` fast.
"""

from __future__ import annotations

from importlib import metadata

import typer

from cli import convert, demo, serve, status, train
from cli import eval as eval_cmd

app = typer.Typer(
    name="quartet",
    help="Quartet: reinforcement-learning fine-tuning (PPO, GRPO, TRPO) of language models, with each "
    "model role (generator, reward, reference, value) served as its own gRPC service and one "
    "orchestrator driving the run.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version() -> None:
    """Print the Quartet version and the versions of grpcio, protobuf and torch."""
    for dist in ("quartet-rl", "grpcio", "protobuf", "torch", "transformers"):
        try:
            found = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found = "not installed"
        typer.echo(f"{dist} {found}")


app.command("serve", help=serve.SERVE_HELP)(serve.serve)
app.command("status")(status.status)
app.command("health")(status.health)
app.command("version")(version)
app.command("train", help=train.TRAIN_HELP)(train.train)
app.command("demo", help=demo.DEMO_HELP)(demo.demo)
app.command("eval", help=eval_cmd.EVAL_HELP)(eval_cmd.eval_checkpoint)
app.command("convert-gguf", help=convert.CONVERT_HELP)(convert.convert_gguf_cmd)


if __name__ == "__main__":
    app()
