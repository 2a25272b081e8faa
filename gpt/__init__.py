"""gptflow's pure-PyTorch GPT library: model, tokenizer, data, training, generation,
checkpoints, OpenAI weight import, and the acquisition/parsing helpers the stages use.

Nothing in this package imports Prefect or DuckDB.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
