"""One module per ``gptflow`` sub-command. Each defines ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed ``argparse.Namespace``
and returning an exit code. Heavy imports (torch, prefect, duckdb) happen inside ``func``
so that ``gptflow --help`` stays fast."""
