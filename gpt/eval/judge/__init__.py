"""Score model responses with local LLM judges (Llama 3 and others) served by Ollama.

Pure library: talks to Ollama through the official ``ollama`` client and knows nothing
about the catalog or Prefect (the judge stage, :mod:`tasks.stages.judge`, stores what it
returns). One module per role:

- :mod:`~gpt.eval.judge.settings` — :class:`~gpt.eval.judge.settings.JudgeConfig` and the
  judge key: every setting that can change a reply, the model's digest included.
- :mod:`~gpt.eval.judge.prompt` — the versioned scoring prompt and the reply schema.
- :mod:`~gpt.eval.judge.reply` — the reader: the score in a reply, or none.
- :mod:`~gpt.eval.judge.hosts` — which servers answer and hold which models (and which
  digest), and spreading requests over them.
- :mod:`~gpt.eval.judge.scoring` — every example × model × repeat, one
  :class:`~gpt.eval.judge.scoring.Judgment` each, failures included.
- :mod:`~gpt.eval.judge.responses` — a JSON file of responses, checked record by record.
"""
