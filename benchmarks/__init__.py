"""Benchmarks and stand-ins that live outside the library: ``suite`` (the registry of what
``gptflow bench`` runs; the benchmarks in ``lm``, ``recipes``, ``rerun`` and ``vs_book``),
``render`` (the docs/performance.md tables from a results JSON), ``peak`` (nominal hardware peaks) and
``ollama_stub`` (a loopback server speaking the Ollama API, used by the judge benchmark
and the tests)."""
