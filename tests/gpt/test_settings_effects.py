"""Every finetune (and pretrain) setting changes what the library does (issue 17, point 8).

``test_stage_contract.py`` checks that a stage hands its settings object to the library;
this checks that the library then acts on each field: the recipe runs on a tiny model
with a base value and with another value of the field, and the observable the field is
meant to change (steps, weights, per-step losses, emitted metrics, samples, the
trainable parameters, written files, or a spy on the kernel or computation it picks)
must differ. The base run is repeated once per recipe to show every observable is
deterministic, so a difference is the setting's doing.

- :class:`~gpt.recipes.classifier.SpamArgs`: every field, through
  :func:`~gpt.recipes.classifier.finetune_classifier`.
- :class:`~gpt.train.LMTrainArgs` (the training fields of the instruction finetune and
  of pretraining): every field, through :func:`~gpt.train.train_lm` on a model with a
  64-token vocabulary (cheap), with loaders built from the settings as the recipes do.
- :class:`~gpt.recipes.instruct.InstructArgs` and
  :class:`~gpt.recipes.pretrain.PretrainArgs`: their own fields, and the loader fields
  (``batch_size``, ``seed``), through the recipe; each training field handed on to
  ``train_lm`` (observable ``train_lm``) must arrive there with its new value — what
  ``train_lm`` does with it is the table above.

The fields come from the classes: a new setting without an entry fails
:func:`test_every_setting_has_a_behavioural_check`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt.config import Args
from gpt.recipes.classifier import SpamArgs
from gpt.recipes.instruct import InstructArgs
from gpt.recipes.pretrain import PretrainArgs
from gpt.train import LMTrainArgs

#: Metrics that are wall-clock measurements (differ from run to run by nature).
TIMED = ("tokens_per_s",)

# (changes to the base settings, the observable that must change[, context: settings
# the field only acts under, applied to both runs])
Variant = tuple[dict[str, Any], str] | tuple[dict[str, Any], str, dict[str, Any]]

SPAM_BASE: dict[str, Any] = {
    "epochs": 2, "batch_size": 4, "lr": 1e-3, "seed": 123, "max_length": 24,
}  # fmt: skip
SPAM_VARIANTS: dict[str, Variant] = {
    "trainable_blocks": ({"trainable_blocks": 2}, "trainable"),
    "train_final_norm": ({"train_final_norm": False}, "trainable"),
    "epochs": ({"epochs": 1}, "steps"),
    "lr": ({"lr": 2e-3}, "weights"),
    "weight_decay": ({"weight_decay": 0.5}, "weights"),
    "batch_size": ({"batch_size": 5}, "steps"),
    "seed": ({"seed": 7}, "weights"),
    "max_length": ({"max_length": 8}, "losses"),
    "pool": ({"pool": "last_real"}, "losses"),
    "prefix_cache": ({"prefix_cache": False}, "spy"),  # same losses, other computation
    "eval_per_epoch": ({"eval_per_epoch": False}, "metrics"),
    "drop_rate": ({"drop_rate": 0.3}, "losses"),
    "drop_last": ({"drop_last": False}, "steps", {"batch_size": 6}),  # 20 = 3·6 + 2
    "cache_chunk": ({"cache_chunk": 3}, "spy"),
    "log_every": ({"log_every": 1}, "metrics"),
    "lora": ({"lora": {"rank": 2}}, "trainable"),
}

LM_BASE: dict[str, Any] = {
    "epochs": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 2, "eval_batches": 1,
    "seed": 123,
}  # fmt: skip
LM_VARIANTS: dict[str, Variant] = {
    "epochs": ({"epochs": 3}, "steps"),
    "lr": ({"lr": 2e-3}, "weights"),
    "weight_decay": ({"weight_decay": 0.5}, "weights"),
    "batch_size": ({"batch_size": 3}, "steps"),
    "eval_every": ({"eval_every": 3}, "metrics"),
    "eval_batches": ({"eval_batches": 2}, "metrics"),
    "warmup_steps": ({"warmup_steps": 3}, "weights"),
    "warmup_start_lr": ({"warmup_start_lr": 1e-4}, "weights", {"warmup_steps": 3}),
    "cosine": ({"cosine": True}, "weights"),
    "min_lr": ({"min_lr": 1e-4}, "weights", {"cosine": True}),
    "grad_clip": ({"grad_clip": 0.01}, "weights"),
    "seed": ({"seed": 7}, "weights"),
    "max_steps": ({"max_steps": 3}, "steps"),
    "log_every": ({"log_every": 1}, "metrics"),
    "fused": ({"fused": False}, "spy"),
    "compile": ({"compile": True}, "spy"),
}
#: What a run reports (see the runners below) and ``train_lm``: the training settings the
#: recipe handed to :func:`~gpt.train.train_lm`.
OBSERVABLES = {"steps", "weights", "losses", "metrics", "trainable", "spy", "samples", "files",
               "train_lm"}  # fmt: skip
#: Training fields a recipe uses itself (its loaders), checked by running the recipe.
LOADER_FIELDS = {"batch_size", "seed"}
#: The other training fields: handed on to train_lm, checked to arrive there.
HANDED: dict[str, Variant] = {
    f: (v[0], "train_lm") for f, v in LM_VARIANTS.items() if f not in LOADER_FIELDS
}

INSTRUCT_BASE: dict[str, Any] = {
    "epochs": 2, "batch_size": 4, "lr": 1e-3, "max_length": 64, "eval_every": 2,
    "eval_batches": 1, "sample_tokens": 3, "seed": 123,
}  # fmt: skip
INSTRUCT_VARIANTS: dict[str, Variant] = {
    **HANDED,
    "batch_size": ({"batch_size": 3}, "steps"),
    "seed": ({"seed": 7}, "weights"),
    "mask_prompt": ({"mask_prompt": True}, "weights"),
    "max_length": ({"max_length": 16}, "weights"),
    "length_bucketing": ({"length_bucketing": True}, "weights"),
    "bucket_factor": ({"bucket_factor": 1}, "weights", {"length_bucketing": True}),
    "drop_rate": ({"drop_rate": 0.3}, "weights"),
    "drop_last": ({"drop_last": False}, "steps"),  # 10 records = 2·4 + 2
    "sample_tokens": ({"sample_tokens": 6}, "samples"),
    "lora": ({"lora": {"rank": 2}}, "weights"),
}
PRETRAIN_BASE: dict[str, Any] = {
    "model": {"name": "tiny"}, "epochs": 1, "batch_size": 2, "eval_every": 2,
    "eval_batches": 1, "sample_tokens": 3, "plot": False, "seed": 123,
}  # fmt: skip
PRETRAIN_VARIANTS: dict[str, Variant] = {
    **HANDED,
    "batch_size": ({"batch_size": 3}, "steps"),
    "seed": ({"seed": 7}, "weights"),
    "model": ({"model": {"name": "tiny", "overrides": {"n_layers": 1}}}, "weights"),
    "sample_prompt": ({"sample_prompt": "The house"}, "samples"),
    "sample_tokens": ({"sample_tokens": 6}, "samples"),
    "plot": ({"plot": True}, "files"),
}


def _keyed_fields(cls: type[Args]) -> set[str]:
    return set(cls.model_fields) - cls.operational_fields()


@pytest.mark.parametrize(
    ("cls", "variants"),
    [
        (SpamArgs, SPAM_VARIANTS),
        (LMTrainArgs, LM_VARIANTS),
        (InstructArgs, INSTRUCT_VARIANTS),
        (PretrainArgs, PRETRAIN_VARIANTS),
    ],
)
def test_every_setting_has_a_behavioural_check(cls: type[Args], variants: dict) -> None:
    """Every setting that is part of the result (not operational) is checked below; a
    field handed on to train_lm is one train_lm's own table checks."""
    assert set(variants) == _keyed_fields(cls), set(variants) ^ _keyed_fields(cls)
    for field, v in variants.items():
        assert v[1] in OBSERVABLES, (field, v[1])
        if v[1] == "train_lm":
            assert field in LM_VARIANTS, field


# --------------------------------------------------------------------------- probes


class _Spy:
    """What the library chose to run: compiled models, AdamW's fused flag, the sizes
    of the frozen-prefix forward passes of the classifier."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import gpt.recipes.classifier_loop as classifier

        self.calls: list[Any] = []
        real_adamw, real_prefix = torch.optim.AdamW, classifier.prefix_hidden
        spy = self

        class AdamW(real_adamw):  # type: ignore[misc, valid-type]
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                spy.calls.append(("adamw fused", bool(self.defaults.get("fused"))))

        def compile_(model: Any, *a: Any, **kw: Any) -> Any:
            spy.calls.append(("compile", type(model).__name__))
            return model  # the compiled program computes the same; keep the test fast

        def prefix(model: Any, idx: torch.Tensor, n_frozen: int) -> torch.Tensor:
            spy.calls.append(("prefix", tuple(idx.shape)))
            return real_prefix(model, idx, n_frozen)

        monkeypatch.setattr(torch.optim, "AdamW", AdamW)
        monkeypatch.setattr(torch, "compile", compile_)
        monkeypatch.setattr(classifier, "prefix_hidden", prefix)

    def take(self) -> list[Any]:
        out, self.calls = self.calls, []
        return out


@pytest.fixture(scope="module")
def spy() -> Any:
    from gpt.tokenizer import Tokenizer

    loaded: dict[str, Tokenizer] = {}
    real = Tokenizer.from_dir.__func__  # type: ignore[attr-defined]

    def from_dir(cls: type[Tokenizer], path: Any) -> Tokenizer:  # built once per folder
        if str(path) not in loaded:
            loaded[str(path)] = real(cls, path)
        return loaded[str(path)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Tokenizer, "from_dir", classmethod(from_dir))
        yield _Spy(mp)


def _weights(folder: Path) -> str:
    """Digest of the tensors of a checkpoint folder (names and values; not the file
    bytes, whose layout may differ for equal tensors, nor its settings files)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    for f in files:
        for name, t in sorted(load_file(f).items()):
            h.update(name.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rows(rows: list[dict[str, Any]]) -> list[tuple]:
    return [
        (r["step"], r.get("epoch"), r["split"], r["name"], r["value"])
        for r in rows
        if r["name"] not in TIMED
    ]


class _Runs:
    """Runs of one recipe. The first base settings run twice (to show every observable
    is deterministic); bases are remembered, so each field's test pays for one run."""

    def __init__(self, run: Callable[[dict[str, Any], Path], dict[str, Any]], root: Path) -> None:
        self.run, self.root, self.n = run, root, 0
        self.bases: dict[str, dict[str, Any]] = {}
        self.inputs: Any = None

    def fresh(self, settings: dict[str, Any]) -> dict[str, Any]:
        self.n += 1
        return self.run(settings, self.root / f"run{self.n}")

    def base(self, settings: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(settings, sort_keys=True)
        if key not in self.bases:
            first = self.fresh(settings)
            if not self.bases:  # the recipe's first base: show it is deterministic
                again = self.fresh(settings)
                for name in first:
                    assert first[name] == again[name], f"{name} is not deterministic"
            self.bases[key] = first
        return self.bases[key]


def _check(runs: _Runs, base: dict[str, Any], variant: Variant, cls: type[Args]) -> None:
    change, observable = variant[0], variant[1]
    context = variant[2] if len(variant) > 2 else {}
    settings = {**base, **context}
    cls.model_validate({**settings, **change})  # a valid value of the field
    first = runs.base(settings)
    other = runs.fresh({**settings, **change})
    assert other[observable] != first[observable], f"{change} left {observable} unchanged"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT, get_config

    torch.manual_seed(7)
    model = GPT(get_config("tiny", drop_rate=0.0, tie_weights=True))
    root = tmp_path_factory.mktemp("base")
    return save_checkpoint(root / "lm", model, tokenizer_dir=tokenizer_dir)


# --------------------------------------------------------------------------- spam


@pytest.fixture(scope="module")
def spam_splits(mirror: Path) -> dict[str, tuple[list[str], list[int]]]:
    from gpt.data.parsing import balance_and_split_spam, parse_sms

    parts = balance_and_split_spam(parse_sms(mirror / "sms+spam+collection.zip"), seed=123)
    sizes = {"train": 20, "val": 4, "test": 4}
    return {
        k: ([r.text for r in parts[k][:n]], [int(r.label == "spam") for r in parts[k][:n]])
        for k, n in sizes.items()
    }


@pytest.fixture(scope="module")
def spam_runs(spam_splits, tiny_lm: Path, spy: _Spy, tmp_path_factory) -> _Runs:
    from gpt.recipes.classifier import finetune_classifier

    def run(settings: dict[str, Any], out: Path) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        res = finetune_classifier(
            tiny_lm, spam_splits, SpamArgs(**settings), out_dir=out, device="cpu",
            on_metrics=rows.extend, progress=False,
        )  # fmt: skip
        return {
            "steps": (res["steps"], res["examples_seen"]),
            "weights": _weights(out),
            "losses": res["step_losses"],
            "metrics": _rows(rows),
            "trainable": res["trainable_params"],
            "spy": spy.take(),
        }

    return _Runs(run, tmp_path_factory.mktemp("spam"))


@pytest.mark.parametrize("field", sorted(SPAM_VARIANTS))
def test_spam_setting_changes_the_finetune(field: str, spam_runs: _Runs) -> None:
    _check(spam_runs, SPAM_BASE, SPAM_VARIANTS[field], SpamArgs)


def test_prefix_cache_changes_the_computation_not_the_losses(spam_runs: _Runs) -> None:
    """The documented promise behind ``prefix_cache`` being a setting at all."""
    cached = spam_runs.base(SPAM_BASE)
    full = spam_runs.fresh({**SPAM_BASE, "prefix_cache": False})
    assert full["losses"] == pytest.approx(cached["losses"], abs=1e-5)
    assert any(c[0] == "prefix" for c in cached["spy"])
    assert not any(c[0] == "prefix" for c in full["spy"])


# --------------------------------------------------------------------------- train_lm


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def train_lm_runs(spy: _Spy, tmp_path_factory) -> _Runs:
    """:func:`train_lm` as a minimal recipe: seeded model and loaders from the settings
    (``batch_size``, ``seed``), random tokens of a 64-id vocabulary."""
    from gpt.data.windows import SlidingWindowDataset, make_loader
    from gpt.model import GPT, get_config
    from gpt.train import train_lm

    ids = torch.randint(0, 64, (260,), generator=torch.Generator().manual_seed(0))
    train_ds = SlidingWindowDataset(ids[:200], 8, 8)
    val_ds = SlidingWindowDataset(ids[200:], 8, 8)

    def run(settings: dict[str, Any], out: Path) -> dict[str, Any]:
        args = LMTrainArgs(**settings)
        torch.manual_seed(args.seed)
        model = GPT(get_config("tiny", vocab_size=64, context_length=8, drop_rate=0.1))
        train = make_loader(train_ds, args.batch_size, shuffle=True, drop_last=True, seed=args.seed)
        val = make_loader(val_ds, args.batch_size, shuffle=False, drop_last=False, seed=args.seed)
        rows: list[dict[str, Any]] = []
        res = train_lm(model, train, val, args, on_metrics=rows.extend, progress=False)
        return {
            "steps": res.steps,
            "weights": _state_digest(model),
            "metrics": _rows(rows),
            "spy": spy.take(),
        }

    return _Runs(run, tmp_path_factory.mktemp("train_lm"))


@pytest.mark.parametrize("field", sorted(LM_VARIANTS))
def test_training_setting_changes_train_lm(field: str, train_lm_runs: _Runs) -> None:
    _check(train_lm_runs, LM_BASE, LM_VARIANTS[field], LMTrainArgs)


class _Handed(Exception):
    """Raised by the stand-in for train_lm once it has the settings it was handed."""


def _handed(
    call: Callable[[Args], Any], where: Any, cls: type[Args], base: dict, field: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The recipe hands the field's new value to train_lm (which acts on it: above)."""
    got: list[LMTrainArgs] = []

    def stand_in(model: Any, train: Any, val: Any, args: LMTrainArgs, **kw: Any) -> Any:
        got.append(args)
        raise _Handed

    monkeypatch.setattr(where, "train_lm", stand_in)
    change = HANDED[field][0]
    for settings in (base, {**base, **change}):
        with pytest.raises(_Handed):
            call(cls.model_validate(settings))
    before, after = got
    assert getattr(after, field) == change[field] != getattr(before, field), field


# --------------------------------------------------------------------------- LM recipes


def _lm_observables(res: dict[str, Any], rows: list, samples: list, ckpt: Path, spy: _Spy) -> dict:
    return {
        "steps": res["steps"],
        "weights": _weights(ckpt),
        "metrics": _rows(rows),
        "samples": [s["text"] for s in samples],
        "spy": spy.take(),
    }


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "cats"]


def _records(n: int, seed: int) -> list[dict[str, str]]:
    """Instruction records of varied lengths (so bucketing and truncation matter)."""
    out = []
    for i in range(n):
        k = 1 + (i * 7 + seed) % len(WORDS)
        out.append(
            {
                "instruction": f"Repeat {k} words.",
                "input": " ".join(WORDS[:k]) if i % 3 else "",
                "output": " ".join(reversed(WORDS[:k])),
            }
        )
    return out


@pytest.fixture(scope="module")
def instruct_runs(tiny_lm: Path, spy: _Spy, tmp_path_factory) -> _Runs:
    from gpt.recipes.instruct import finetune_instruct

    train, val = _records(10, 0), _records(8, 5)

    def run(settings: dict[str, Any], out: Path) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        res = finetune_instruct(
            tiny_lm, train, val, InstructArgs(**settings), out_dir=out, device="cpu",
            on_metrics=rows.extend, on_sample=samples.append, progress=False,
        )  # fmt: skip
        return _lm_observables(res, rows, samples, out, spy)

    return _Runs(run, tmp_path_factory.mktemp("instruct"))


def _own(variants: dict[str, Variant]) -> list[str]:
    return sorted(f for f, v in variants.items() if v[1] != "train_lm")


@pytest.mark.parametrize("field", _own(INSTRUCT_VARIANTS))
def test_instruct_setting_changes_the_finetune(field: str, instruct_runs: _Runs) -> None:
    _check(instruct_runs, INSTRUCT_BASE, INSTRUCT_VARIANTS[field], InstructArgs)


@pytest.mark.parametrize("field", sorted(HANDED))
def test_instruct_hands_its_training_settings_to_train_lm(
    field: str, tiny_lm: Path, spy: _Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpt.train
    from gpt.recipes.instruct import finetune_instruct

    recs = _records(10, 0)

    def call(args: Args) -> Any:
        return finetune_instruct(
            tiny_lm, recs, recs[:4], args, out_dir=tmp_path, device="cpu", progress=False
        )

    _handed(call, gpt.train, InstructArgs, INSTRUCT_BASE, field, monkeypatch)


@pytest.fixture(scope="module")
def pretrain_runs(mirror: Path, tokenizer_dir: Path, spy: _Spy, tmp_path_factory) -> _Runs:
    from gpt.data.windows import tokenize_to_npy
    from gpt.recipes.pretrain import pretrain
    from gpt.tokenizer import Tokenizer

    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")[:900]
    tok = Tokenizer.from_dir(tokenizer_dir)
    root = tmp_path_factory.mktemp("pretrain")
    cut = int(len(text) * 0.8)
    tokens = (root / "train.npy", root / "val.npy")
    tokenize_to_npy(text[:cut], tok, tokens[0])
    tokenize_to_npy(text[cut:], tok, tokens[1])

    def run(settings: dict[str, Any], out: Path) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        res = pretrain(
            *tokens, tokenizer_dir, out, PretrainArgs.model_validate(settings),
            max_length=16, stride=16, device="cpu", on_metrics=rows.extend,
            on_sample=samples.append, progress=False,
        )  # fmt: skip
        return {
            **_lm_observables(res.to_dict(), rows, samples, res.final_dir, spy),
            "files": sorted(p.name for p in out.iterdir()),
        }

    runs = _Runs(run, root)
    runs.inputs = (tokens, tokenizer_dir)
    return runs


@pytest.mark.parametrize("field", _own(PRETRAIN_VARIANTS))
def test_pretrain_setting_changes_the_training(field: str, pretrain_runs: _Runs) -> None:
    _check(pretrain_runs, PRETRAIN_BASE, PRETRAIN_VARIANTS[field], PretrainArgs)


@pytest.mark.parametrize("field", sorted(HANDED))
def test_pretrain_hands_its_training_settings_to_train_lm(
    field: str, pretrain_runs: _Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpt.recipes.pretrain as recipe

    tokens, tokenizer_dir = pretrain_runs.inputs

    def call(args: Args) -> Any:
        return recipe.pretrain(
            *tokens, tokenizer_dir, tmp_path, args, max_length=16, stride=16, device="cpu",
            progress=False,
        )  # fmt: skip

    _handed(call, recipe, PretrainArgs, PRETRAIN_BASE, field, monkeypatch)
