"""Demo tooling, not runtime code: the tiny model kit (a character tokenizer, tiny Llama-style models,
the arithmetic task, a supervised warm-up, greedy evaluation) and `quartet demo` itself.

Used by `quartet demo`, the tests and the benchmarks; no service imports it.
"""
