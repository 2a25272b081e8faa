"""Small evaluation helpers used by the load_gpt2 stage: a greedy sample and the
perplexity of a model over a token file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpt.data.windows import load_tokens
from gpt.generate import generate
from gpt.model import GPT
from gpt.tokenizer import Tokenizer


def greedy_sample(
    model: GPT, tokenizer_dir: str | Path, *, prompt: str, max_new_tokens: int
) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` by up to ``max_new_tokens`` tokens."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = tok.encode(prompt)
    new = generate(model, [ids], max_new_tokens, eos_id=tok.eot_id)[0]
    return {"prompt": prompt, "text": tok.decode(new)}


@torch.inference_mode()
def perplexity_on_tokens(
    model: GPT, tokens_path: str | Path, *, max_length: int | None = None
) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of a uint16 token
    file; every predicted token counts once. The last partial window is included."""
    ids = torch.from_numpy(load_tokens(Path(tokens_path), mmap=False).astype("int64"))
    ids = ids.to(model.tok_emb.weight.device)
    if ids.numel() < 2:
        return float("nan")
    length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        for s in range(0, ids.numel() - 1, length):
            y = ids[s + 1 : s + length + 1].unsqueeze(0)
            x = ids[s : s + y.shape[1]].unsqueeze(0)
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            total_loss += float(loss)
            total_tokens += y.numel()
    finally:
        model.train(was_training)
    return math.exp(total_loss / total_tokens)
