"""The Hugging Face ``transformers`` GPT-2 layout, both ways.

* :func:`load_hf_gpt2` / :func:`convert_hf_checkpoint` read GPT-2 weights from a
  ``model.safetensors`` + ``config.json`` folder, the layout of the Hub's
  ``openai-community/gpt2`` (``-medium``, ``-large``, ``-xl``) repositories and of
  ``save_pretrained`` — without TensorFlow and without ``transformers``.
* :func:`gpt_to_hf_state` and :func:`hf_config` are the export direction;
  :mod:`gpt.weights.hf_export` writes whole folders with them.

HF's GPT-2 uses "Conv1D" layers that store their weight as (in, out): those need a
transpose for ``nn.Linear``. The fused ``c_attn`` projection is ordered q | k | v with
heads contiguous, exactly like our ``qkv`` projection, so no re-ordering is needed.
Every tensor is checked against the shape the config implies, in both directions.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gpt.errors import CheckpointError, ConfigError
from gpt.model import GPT, GPTConfig

__all__ = [
    "HF_CONFIG",
    "HF_WEIGHTS",
    "convert_hf_checkpoint",
    "expected_hf_shapes",
    "gpt_to_hf_state",
    "hf_config",
    "hf_name_map",
    "load_hf_gpt2",
    "read_hf_config",
]

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
#: Prefix of the transformer body's tensors in a ``GPT2LMHeadModel`` /
#: ``GPT2ForSequenceClassification`` state dict (absent in the Hub's GPT-2 files, which
#: were saved from a bare ``GPT2Model``).
BODY_PREFIX = "transformer."

#: HF name (under the body) -> our parameter name, for the tensors outside the blocks.
_TOP_MAP: dict[str, str] = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.weight",
    "ln_f.bias": "final_norm.bias",
}
#: Per-block HF name (under ``h.{i}.``) -> (our name under ``blocks.{i}.``, Conv1D weight
#: that needs a transpose).
_BLOCK_MAP: dict[str, tuple[str, bool]] = {
    "ln_1.weight": ("norm1.weight", False),
    "ln_1.bias": ("norm1.bias", False),
    "attn.c_attn.weight": ("att.qkv.weight", True),
    "attn.c_attn.bias": ("att.qkv.bias", False),
    "attn.c_proj.weight": ("att.out_proj.weight", True),
    "attn.c_proj.bias": ("att.out_proj.bias", False),
    "ln_2.weight": ("norm2.weight", False),
    "ln_2.bias": ("norm2.bias", False),
    "mlp.c_fc.weight": ("ff.fc1.weight", True),
    "mlp.c_fc.bias": ("ff.fc1.bias", False),
    "mlp.c_proj.weight": ("ff.fc2.weight", True),
    "mlp.c_proj.bias": ("ff.fc2.bias", False),
}
#: Per-block buffers that older ``transformers`` versions saved next to the weights (the
#: causal mask and a constant); the Hub's GPT-2 files hold them. Not parameters.
_BUFFER_RE = re.compile(r"^h\.(\d+)\.attn\.(bias|masked_bias)$")
#: GELU variants that are the tanh approximation GPT-2 (and our model) uses.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def hf_name_map(n_layers: int) -> dict[str, tuple[str, bool]]:
    """Every HF GPT-2 body tensor name (without :data:`BODY_PREFIX`) of an ``n_layers``
    model -> (our parameter name, Conv1D transpose?)."""
    names = {k: (v, False) for k, v in _TOP_MAP.items()}
    for i in range(n_layers):
        for k, (ours, t) in _BLOCK_MAP.items():
            names[f"h.{i}.{k}"] = (f"blocks.{i}.{ours}", t)
    return names


def expected_hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF body tensor implied by the architecture (HF's own layout:
    Conv1D weights are (in, out)), derived from the config alone."""
    d, v, c = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    block = {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d),
        "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, 4 * d),
        "mlp.c_fc.bias": (4 * d,),
        "mlp.c_proj.weight": (4 * d, d),
        "mlp.c_proj.bias": (d,),
    }
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (v, d),
        "wpe.weight": (c, d),
        "ln_f.weight": (d,),
        "ln_f.bias": (d,),
    }
    for i in range(cfg.n_layers):
        shapes |= {f"h.{i}.{k}": s for k, s in block.items()}
    return shapes


def _check_shapes(
    tensors: Mapping[str, torch.Size | tuple[int, ...]], cfg: GPTConfig, where: str
) -> None:
    want = expected_hf_shapes(cfg)
    bad = [
        f"{k}: {tuple(tensors[k])}, expected {s}"
        for k, s in want.items()
        if k in tensors and tuple(tensors[k]) != s
    ]
    if bad:
        raise CheckpointError(
            f"{where}: tensor shapes do not match the architecture "
            f"(emb {cfg.emb_dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
            f"context {cfg.context_length}): " + "; ".join(bad[:8])
        )


# --------------------------------------------------------------------------- export side


def gpt_to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    """The HF body tensors (names without :data:`BODY_PREFIX`) of ``model``, float32 on
    the CPU. A model without a QKV bias gets an all-zero ``c_attn.bias`` (HF's GPT-2
    always has one; zeros compute the same function). The head is not included."""
    cfg = model.cfg
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for hf, (name, transpose) in hf_name_map(cfg.n_layers).items():
        if name not in ours:
            if name.endswith("att.qkv.bias") and not cfg.qkv_bias:
                out[hf] = torch.zeros(3 * cfg.emb_dim, dtype=torch.float32)
                continue
            raise CheckpointError(f"model has no parameter {name!r} (needed for HF {hf!r})")
        t = ours[name].detach().to(device="cpu", dtype=torch.float32)
        out[hf] = (t.t() if transpose else t).contiguous().clone()
    _check_shapes({k: v.shape for k, v in out.items()}, cfg, "export")
    return out


def hf_config(
    cfg: GPTConfig,
    *,
    eot_id: int,
    tied: bool = True,
    labels: list[str] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """A ``transformers`` ``GPT2Config`` dict for ``cfg``: a ``GPT2LMHeadModel``, or with
    ``labels`` a ``GPT2ForSequenceClassification`` with one output per label."""
    drop = float(cfg.drop_rate)
    d: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2ForSequenceClassification" if labels else "GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": drop,
        "embd_pdrop": drop,
        "attn_pdrop": drop,
        "layer_norm_epsilon": float(cfg.ln_eps),
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": pad_token_id,
        "tie_word_embeddings": bool(tied) and not labels,
        "use_cache": True,
        "dtype": "float32",
    }
    if labels:
        d["num_labels"] = len(labels)
        d["id2label"] = {str(i): lab for i, lab in enumerate(labels)}
        d["label2id"] = {lab: i for i, lab in enumerate(labels)}
        d["problem_type"] = "single_label_classification"
    return d


# --------------------------------------------------------------------------- import side


def _read_json(f: Path) -> dict[str, Any]:
    if not f.is_file():
        raise CheckpointError(
            f"{f} not found: a Hugging Face GPT-2 folder holds {HF_CONFIG} and {HF_WEIGHTS}"
        )
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{f} must hold a JSON object")
    return data


def read_hf_config(
    folder: str | Path, *, drop_rate: float = 0.0, attention: str = "sdpa"
) -> tuple[GPTConfig, bool]:
    """(GPTConfig, tied head?) from ``folder/config.json`` of a GPT-2 language model.

    Settings our model cannot reproduce (another activation, a custom MLP width,
    unscaled or layer-scaled attention) raise :class:`CheckpointError` naming them."""
    f = Path(folder) / HF_CONFIG
    hc = _read_json(f)
    if hc.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{f}: model_type is {hc.get('model_type')!r}, not 'gpt2'")
    archs = hc.get("architectures") or ["GPT2LMHeadModel"]
    if not set(archs) <= {"GPT2LMHeadModel", "GPT2Model"}:
        raise CheckpointError(
            f"{f}: architectures {archs}; only GPT-2 language models (GPT2LMHeadModel) import"
        )
    problems = []
    if hc.get("activation_function", "gelu_new") not in _TANH_GELU:
        problems.append(f"activation_function={hc.get('activation_function')!r}")
    if hc.get("n_inner") not in (None, 4 * int(hc.get("n_embd", 0))):
        problems.append(f"n_inner={hc.get('n_inner')!r}")
    if not hc.get("scale_attn_weights", True) or hc.get("scale_attn_by_inverse_layer_idx"):
        problems.append("attention scaling")
    if hc.get("add_cross_attention"):
        problems.append("add_cross_attention")
    if problems:
        raise CheckpointError(f"{f}: settings gptflow's GPT cannot reproduce: {problems}")
    try:
        cfg = GPTConfig(
            vocab_size=int(hc["vocab_size"]),
            context_length=int(hc.get("n_positions", hc.get("n_ctx"))),
            emb_dim=int(hc["n_embd"]),
            n_heads=int(hc["n_head"]),
            n_layers=int(hc["n_layer"]),
            drop_rate=float(drop_rate),
            qkv_bias=True,
            tie_weights=bool(hc.get("tie_word_embeddings", True)),
            attention=attention,  # type: ignore[arg-type]
            ln_eps=float(hc.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as exc:
        raise CheckpointError(
            f"{f} lacks key {exc} (needs vocab_size, n_embd, n_head, n_layer)"
        ) from exc
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{f}: {exc}") from exc
    return cfg, cfg.tie_weights


def _split_keys(keys: list[str], f: Path) -> tuple[str, set[str]]:
    """The body prefix used by the file ('' or 'transformer.') and the ignored buffers."""
    prefixed = [k for k in keys if k.startswith(BODY_PREFIX)]
    prefix = BODY_PREFIX if prefixed else ""
    if prefixed and any(not k.startswith(BODY_PREFIX) and k != "lm_head.weight" for k in keys):
        raise CheckpointError(f"{f}: mixes tensors with and without the {BODY_PREFIX!r} prefix")
    buffers = {k for k in keys if _BUFFER_RE.match(k[len(prefix) :] if prefix else k)}
    return prefix, buffers


def load_hf_gpt2(folder: str | Path, *, drop_rate: float = 0.0, attention: str = "sdpa") -> GPT:
    """A :class:`GPT` holding the GPT-2 weights of a Hugging Face folder
    (``config.json`` + ``model.safetensors``; bare ``GPT2Model`` names as on the Hub, or
    ``transformer.``-prefixed ones as ``save_pretrained`` writes).

    Every tensor must map to exactly one parameter with the shape the config implies;
    unknown, missing or misshapen tensors raise :class:`CheckpointError` listing them.
    The old per-block attention-mask buffers are skipped. An untied ``lm_head.weight``
    (``tie_word_embeddings: false``) becomes an untied output head.
    """
    from safetensors import SafetensorError, safe_open

    from gpt.checkpoint_io import check_safetensors_header

    folder = Path(folder)
    cfg, tied = read_hf_config(folder, drop_rate=drop_rate, attention=attention)
    f = folder / HF_WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{f} not found: a Hugging Face GPT-2 folder holds {HF_WEIGHTS}")
    check_safetensors_header(f)
    name_map = hf_name_map(cfg.n_layers)
    with torch.device("meta"):
        model = GPT(cfg)
    targets = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            keys = list(st.keys())
            prefix, buffers = _split_keys(keys, f)
            body = {k[len(prefix) :]: k for k in keys if k not in buffers and k != "lm_head.weight"}
            unknown = sorted(set(body) - set(name_map))
            missing = sorted(set(name_map) - set(body))
            if tied is False and "lm_head.weight" not in keys:
                missing.append("lm_head.weight")
            if unknown or missing:
                raise CheckpointError(
                    f"{f} does not match {HF_CONFIG} ({cfg.n_layers} layers): unknown tensors "
                    f"{unknown[:10]}, missing tensors {missing[:10]}"
                )
            shapes = {hf: tuple(st.get_slice(k).get_shape()) for hf, k in body.items()}
            _check_shapes(shapes, cfg, str(f))
            for hf, key in body.items():
                ours, transpose = name_map[hf]
                t = st.get_tensor(key).to(torch.float32)
                state[ours] = (t.t() if transpose else t).contiguous()
            if "lm_head.weight" in keys:
                head = st.get_tensor("lm_head.weight").to(torch.float32)
                if tuple(head.shape) != (cfg.vocab_size, cfg.emb_dim):
                    raise CheckpointError(
                        f"{f}: lm_head.weight is {tuple(head.shape)}, expected "
                        f"{(cfg.vocab_size, cfg.emb_dim)}"
                    )
                if tied:
                    if not torch.equal(head, state["tok_emb.weight"]):
                        raise CheckpointError(
                            f"{f}: lm_head.weight differs from wte.weight but {HF_CONFIG} says "
                            "tie_word_embeddings is true; fix the config"
                        )
                else:
                    state["out_head.weight"] = head.contiguous()
    except SafetensorError as exc:
        raise CheckpointError(f"cannot read {f}: {exc}") from exc
    for name, t in state.items():  # the other direction: against our model's own shapes
        if tuple(t.shape) != tuple(targets[name].shape):
            raise CheckpointError(
                f"{f}: {name} would be {tuple(t.shape)}, model needs {tuple(targets[name].shape)}"
            )
    missing_keys, unexpected = model.load_state_dict(state, strict=False, assign=True)
    leftover = [k for k in missing_keys if not (tied and k == "out_head.weight")]
    if leftover or unexpected:  # defensive: the name map covers every parameter
        raise CheckpointError(f"internal HF name map incomplete: {leftover} {unexpected}")
    if tied:
        model.out_head.weight = model.tok_emb.weight
    model.eval()
    log.info("imported HF GPT-2 (%d layers, emb %d) from %s", cfg.n_layers, cfg.emb_dim, folder)
    return model


def _tokenizer_source(folder: Path, tokenizer_dir: str | Path | None) -> Path | None:
    """A folder with encoder.json + vocab.bpe: ``tokenizer_dir``, ``folder`` itself, or a
    temp copy of HF's same-content vocab.json + merges.txt (caller removes it)."""
    for cand in (tokenizer_dir, folder):
        if cand is not None and all(
            (Path(cand) / n).is_file() for n in ("encoder.json", "vocab.bpe")
        ):
            return Path(cand)
    if all((folder / n).is_file() for n in ("vocab.json", "merges.txt")):
        tmp = Path(tempfile.mkdtemp(prefix=".hf-tokenizer-", dir=folder.parent))
        shutil.copyfile(folder / "vocab.json", tmp / "encoder.json")
        shutil.copyfile(folder / "merges.txt", tmp / "vocab.bpe")
        return tmp
    return None


def convert_hf_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    drop_rate: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Import the HF GPT-2 folder ``hf_dir`` and save it as a gptflow checkpoint at
    ``out_dir``, with the tokenizer from ``tokenizer_dir``, else ``hf_dir``
    (encoder.json/vocab.bpe, or HF's vocab.json/merges.txt). Returns the path."""
    from gpt.checkpoint import save_checkpoint

    folder = Path(hf_dir)
    model = load_hf_gpt2(folder, drop_rate=drop_rate)
    tok = _tokenizer_source(folder, tokenizer_dir)
    staged = tok is not None and tok.name.startswith(".hf-tokenizer-")
    info = {"source": "hf-gpt2", "hf_release": folder.name, **(meta or {})}  # not a path
    try:
        out = save_checkpoint(out_dir, model, tokenizer_dir=tok, meta=info)
    finally:
        if staged:
            shutil.rmtree(tok, ignore_errors=True)  # type: ignore[arg-type]
    if tok is None:
        log.warning("no tokenizer files found; checkpoint %s has no tokenizer", out)
    return out
