"""`quartet eval CHECKPOINT --task FILE`: greedy accuracy of a checkpoint on a task file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EVAL_HELP = "Greedy accuracy of a checkpoint (a Hugging Face directory) on a jsonl task of {prompt, answer} rows."


def eval_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="Model directory (e.g. runs/grpo/checkpoints/latest/policy).")],
    task: Annotated[Path, typer.Option("--task", help="jsonl file with prompt and answer fields.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens generated per prompt.")] = 6,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Evaluate the first N rows (0 = all).")] = 0,
    show: Annotated[int, typer.Option("--show", min=0, help="Print this many examples.")] = 5,
) -> None:
    from rich.console import Console
    from rich.text import Text

    from demo.modelkit.arithmetic import load_jsonl
    from demo.modelkit.evaluate import greedy_accuracy
    from services.common.hf import load_causal_lm, load_tokenizer

    console = Console()
    path = checkpoint / "policy" if (checkpoint / "policy" / "config.json").is_file() else checkpoint
    try:
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, dtype=__import__("torch").float32, device="cpu")
        rows = load_jsonl(task)
    except (FileNotFoundError, ValueError) as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)))
        raise typer.Exit(2) from None
    rows = rows[:limit] if limit else rows
    result = greedy_accuracy(model, tokenizer, rows, max_new_tokens=max_new_tokens)
    for prompt, completion, answer in result.examples[:show]:
        console.print(f"  {prompt}{completion!r}  (answer {answer})", markup=False)
    console.print(f"[bold]accuracy {result.accuracy:.1%}[/] ({result.correct}/{result.n}) of {path} on {task}")
