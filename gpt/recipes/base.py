"""The load_gpt2 stage's library side: the base checkpoints the finetunes start from.

``base_model = "gpt2"`` imports OpenAI's released weights (one folder per size needed);
``"scratch"`` takes the pretrain stage's checkpoint. Either way each base is evaluated
once (a greedy sample and the perplexity on the validation tokens) so runs can be
compared before any finetuning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.args import LoadGPT2Args
from gpt.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class BaseResult:
    """What :func:`prepare_bases` wrote (folders relative to ``out_dir``)."""

    spam: str
    """Folder of the spam classifier's base checkpoint."""
    instruct: str
    """Folder of the instruction finetune's base checkpoint."""
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per folder: ``{"sample": {"prompt", "text"}, "val_perplexity": float}``."""


def prepare_bases(
    args: LoadGPT2Args,
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    val_tokens: Path,
    pretrain_checkpoint: Path | None = None,
    releases: dict[str, Path] | None = None,
    device: str = "auto",
) -> BaseResult:
    """Write the base checkpoint folder(s) into ``out_dir`` and evaluate each one.

    ``scratch``: ``pretrain_checkpoint`` is linked (or copied) to ``out_dir/scratch``.
    ``gpt2``: ``releases`` maps each size of :meth:`LoadGPT2Args.sizes` to the folder of
    its release files (OpenAI's TensorFlow files, or the Hugging Face safetensors with
    ``source = "hf"``), converted to ``out_dir/gpt2-<size>``.
    """
    from gpt.checkpoint import load_checkpoint
    from gpt.device import resolve_device
    from gpt.eval.metrics import greedy_sample, perplexity_on_tokens
    from gpt.fileio import link_or_copy_tree
    from gpt.weights.hf import convert_hf_checkpoint
    from gpt.weights.openai import convert_openai_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.base_model == "scratch":
        if pretrain_checkpoint is None:
            raise ConfigError("base_model 'scratch' needs the pretrain stage's checkpoint")
        target = out_dir / "scratch"
        if not target.exists():
            link_or_copy_tree(pretrain_checkpoint, target)
    else:
        releases = releases or {}
        missing = [s for s in args.sizes() if s not in releases]
        if missing:
            raise ConfigError(f"GPT-2 release folder(s) for {missing} were not given")
        for size in args.sizes():
            if args.source == "hf":
                convert_hf_checkpoint(releases[size], out_dir / f"gpt2-{size}", tokenizer_dir)
            else:
                convert_openai_checkpoint(releases[size], out_dir / f"gpt2-{size}")
    dev = resolve_device(device)
    result = BaseResult(spam=args.folder("spam"), instruct=args.folder("instruct"))
    for folder in dict.fromkeys([result.spam, result.instruct]):
        model = load_checkpoint(out_dir / folder).model.to(dev)
        sample = greedy_sample(
            model, tokenizer_dir, prompt=args.sample_prompt, max_new_tokens=args.sample_tokens
        )
        ppl = perplexity_on_tokens(model, val_tokens)
        log.info("base %s: val perplexity %.2f, sample %r", folder, ppl, sample["text"])
        result.evaluations[folder] = {"sample": sample, "val_perplexity": ppl}
    return result
