"""Benchmarks and stand-ins that live outside the library: ``suite`` (what ``gptflow bench``
runs) and ``ollama_stub`` (a loopback server speaking the Ollama API, used by the judge
benchmark and the tests)."""
