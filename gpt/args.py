"""The settings of the library's recipes, declared once and torch-free.

Each class is both what a recipe takes (``pretrain(args=PretrainArgs(...))``) and a
section of the pipeline's config (``flows.config.PipelineConfig``), so a profile value, a
``--set`` override and a cache key mean one field of one type. They live apart from the
recipes so that building and checking the settings — every ``gptflow run``, a rerun whose
stages are all cached — never imports torch: a rule that needs the model (the LoRA layer
names) imports it only when that setting is used.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gpt.architecture import GPTConfig, get_config
from gpt.config import Args, FieldError, operational
from gpt.decode_options import DraftName, WeightsKind
from gpt.errors import ConfigError
from gpt.layout import DistributedArgs

__all__ = [
    "DistributedLMArgs",
    "ExtractArgs",
    "GPT2Size",
    "InstructArgs",
    "LMTrainArgs",
    "LoadGPT2Args",
    "LoraArgs",
    "LoraSetting",
    "ModelSpec",
    "PrepareArgs",
    "PretrainArgs",
    "SpamArgs",
    "windows_problem",
]


def _lora_layer_names() -> tuple[str, ...]:
    """The layer names a LoRA setting may use, derived from the model (imports torch:
    only when a ``lora`` setting is given)."""
    from gpt.lora import lora_layer_names

    return lora_layer_names()


class LoraArgs(Args):
    """Low-rank adaptation of a finetune (``finetune_spam.lora``, ``finetune_instruct.lora``;
    unset = full finetune). Every base weight is frozen; only the adapters (and, for the
    classifier, whatever ``trainable_blocks`` / ``train_final_norm`` still name) train.
    ``--set finetune_spam.lora=true`` takes the defaults below (the book's setting)."""

    rank: int = Field(16, ge=1)
    """Rank r of each update ``B A`` (A: r × in, B: out × r)."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by ``alpha / rank`` (peft's convention;
    the book multiplies by ``alpha`` itself, so its rank 16 / alpha 16 is alpha 256 here)."""
    layers: tuple[str, ...] = Field(default_factory=lambda: _lora_layer_names())
    """Which linear layers of every block (and the output head) get an adapter, by name:
    ``query``, ``key``, ``value`` (the parts of the fused ``qkv``), ``out_proj``, ``fc1``,
    ``fc2``, ``out_head``; ``"all"`` (the default, as in the book) is every one of them."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training (the base path has none of it)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {} if data is True else data

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        known = _lora_layer_names()
        if value == "all" or (isinstance(value, list | tuple) and "all" in value):
            return known
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            unknown = [v for v in value if v not in known]
            if unknown:
                raise ValueError(
                    f"unknown layer name(s) {unknown}; choose from {list(known)} or 'all'"
                )
            if not value:
                raise ValueError(f"name at least one layer of {list(known)} (or 'all')")
            return tuple(n for n in known if n in value)  # one order: one cache key
        return value


def _off(value: Any) -> Any:
    return None if value is False else value


#: The type of a finetune's ``lora`` field: None (or ``false``) = off, ``true`` = the
#: defaults of :class:`LoraArgs`, an object = those settings.
LoraSetting = Annotated[LoraArgs | None, BeforeValidator(_off)]


class LMTrainArgs(Args):
    """Hyperparameters of :func:`train_lm` (defaults: the reference pretraining recipe)."""

    epochs: int = Field(10, ge=1)
    """Passes over the training loader."""
    lr: float = Field(4e-4, ge=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (applied to every parameter, as in the reference)."""
    batch_size: int = Field(2, ge=1)
    """Sequences per optimizer step (the loaders are built with it)."""
    eval_every: int = Field(5, ge=1)
    """Evaluate (and emit metrics) after optimizer steps 1, 1 + eval_every, 1 + 2·eval_every,
    … (the reference's ``global_step % eval_freq == 0`` with a 0-based step) and after the
    last step."""
    eval_batches: int = Field(5, ge=1)
    """Batches of each loader averaged for the train/val loss at an evaluation."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from ``warmup_start_lr`` to ``lr`` over this many steps (0 = none)."""
    warmup_start_lr: float = Field(3e-5, ge=0)
    """Learning rate of the first warmup step (capped at ``lr``)."""
    cosine: bool = False
    """Cosine-decay the learning rate from ``lr`` to ``min_lr`` after the warmup, over the
    rest of ``epochs × len(train_loader)`` steps (``max_steps`` does not shorten it)."""
    min_lr: float = Field(0.0, ge=0)
    """Final learning rate of the cosine decay (at most ``lr``)."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value (None = off)."""
    checkpoint_every: int = operational(0, ge=0)
    """Also checkpoint to ``out_dir/last`` every this many steps (0 = only at the end of
    each epoch and of training)."""
    seed: int = 123
    """Seed of torch's global RNG (dropout) at the start of a fresh run."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps in total (None = run all epochs)."""
    log_every: int = Field(0, ge=0)
    """Also emit a train ``step_loss`` row (the optimizer step's own loss) every this
    many steps (0 = never)."""
    fused: bool | None = None
    """Fused AdamW kernel: None = use it when this torch supports it for the parameters'
    device, True = require it, False = plain implementation."""
    compile: bool = False
    """Run the training steps through ``torch.compile`` (the first steps pay the
    compilation; whether it pays off is measured by ``gptflow bench``)."""

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> Self:
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"{self.min_lr} must not exceed lr ({self.lr})")
        return self


class DistributedLMArgs(LMTrainArgs):
    """:class:`LMTrainArgs` plus the process layout of the training stages that run
    :func:`train_lm` (pretraining, the instruction finetune)."""

    distributed: DistributedArgs = operational(default_factory=DistributedArgs)
    """How many processes train (``nproc = 1``: the calling process; more: under
    torchrun, see :class:`~gpt.layout.DistributedArgs`). ``batch_size`` stays the
    global batch and must split evenly over the processes. The recipes launch
    themselves on this layout (:func:`gpt.distributed.launch.relaunch`). Operational: with dropout off, N processes
    give the per-step losses and final weights of 1 process with the same global batch
    within ~1e-5 (float rounding), so the layout is not part of the cache key; with
    dropout on, the masks depend on the layout and another layout gives an equally valid
    but different sample, served from the same cache entry."""

    @field_validator("distributed")
    @classmethod
    def _batch_splits(cls, v: DistributedArgs, info: ValidationInfo) -> DistributedArgs:
        if "batch_size" in info.data:  # else batch_size itself was invalid
            v.check_batch(info.data["batch_size"], "batch_size")
        return v


class PrepareArgs(Args):
    """How the inputs are cut, split and windowed (the pipeline's ``tokenize`` section)."""

    train_ratio: float = Field(0.9, gt=0, lt=1)
    """Pretraining text split by characters: this share (from the start) is train, the
    rest validation."""
    text_chars: int | None = Field(None, gt=0)
    """Use only the first N characters of the pretraining text (smoke runs)."""
    max_length: int = Field(256, gt=1)
    """Pretraining window length in tokens (the reference uses the context length, 256);
    must fit the pretrained model's context."""
    stride: int = Field(256, gt=0)
    """Step between pretraining window starts."""
    spam_seed: int = 123
    """Seed of ham undersampling and of the shuffle before the spam split."""
    spam_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """Train/validation/test shares of the balanced SMS set: each above 0, summing to 1."""
    spam_limit: int | None = Field(None, gt=0)
    """Keep at most N examples per spam split (smoke runs); None keeps all."""
    instruct_train: float = Field(0.85, gt=0, lt=1)
    """Share of instruction records for training (in file order unless shuffled)."""
    instruct_test: float = Field(0.10, gt=0, lt=1)
    """Share for the test split; the rest is validation."""
    instruct_shuffle_seed: int | None = None
    """Shuffle instruction records with this seed before splitting; None keeps file order."""
    instruct_limit: int | None = Field(None, gt=0)
    """Keep at most N records per instruction split (smoke runs)."""

    @model_validator(mode="after")
    def _shares(self) -> Self:
        if not all(0 < r < 1 for r in self.spam_ratios):
            raise FieldError(
                "spam_ratios",
                f"{list(self.spam_ratios)}: each share must lie strictly between 0 and 1 "
                "(an empty split cannot be trained or scored)",
            )
        if abs(sum(self.spam_ratios) - 1.0) > 1e-6:
            raise FieldError(
                "spam_ratios",
                f"{list(self.spam_ratios)} sum to {sum(self.spam_ratios):g}; the train, "
                "validation and test shares must sum to 1, e.g. [0.7, 0.1, 0.2]",
            )
        if self.instruct_train + self.instruct_test > 1.0 + 1e-9:
            raise FieldError(
                "instruct_test",
                f"instruct_train ({self.instruct_train}) + instruct_test "
                f"({self.instruct_test}) exceed 1; the rest of the records is validation",
            )
        return self


class ModelSpec(Args):
    """Which architecture to build: a named config plus field overrides."""

    name: str = "gpt2-small-256"
    """A name from :data:`gpt.architecture.CONFIGS` (default: the reference's 256-context 124M)."""
    overrides: dict[str, int | float | bool | str] = Field(default_factory=dict)
    """GPTConfig fields to change, e.g. ``{"n_layers": 2, "emb_dim": 64}``."""

    def build(self) -> GPTConfig:
        """The :class:`~gpt.architecture.GPTConfig` (unknown names/fields raise ConfigError)."""
        return get_config(self.name, **self.overrides)

    @model_validator(mode="after")
    def _buildable(self) -> Self:
        """The architecture is built with the settings: a bad name, an unknown override
        field, an override of the wrong type (strict, as every setting) or an impossible
        combination (``emb_dim`` not divisible by ``n_heads``) is refused here."""
        from gpt.tokenizer import GPT2_VOCAB_SIZE

        try:
            get_config(self.name)
        except ConfigError as exc:
            raise FieldError("name", str(exc)) from None
        hints = typing.get_type_hints(GPTConfig)
        for key, value in self.overrides.items():
            if key not in hints:
                raise FieldError(
                    f"overrides.{key}", f"not a GPTConfig field; fields: {', '.join(hints)}"
                )
            try:
                TypeAdapter(hints[key]).validate_python(value, strict=True)
            except ValidationError as exc:
                raise FieldError(f"overrides.{key}", exc.errors()[0]["msg"]) from None
        try:
            cfg = self.build()
        except ConfigError as exc:
            raise FieldError("overrides", str(exc)) from None
        if cfg.vocab_size < GPT2_VOCAB_SIZE:
            raise FieldError(
                "overrides.vocab_size",
                f"{cfg.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB_SIZE} ids",
            )
        return self


def windows_problem(max_length: int, model: GPTConfig) -> str | None:
    """Why windows of ``max_length`` tokens cannot train ``model`` (None when they can):
    checked with the settings (``tokenize.max_length`` against ``pretrain.model``) and
    again by :func:`pretrain` for direct callers."""
    if max_length > model.context_length:
        return (
            f"the windows are {max_length} tokens but the model has a context length of "
            f"{model.context_length}; lower tokenize.max_length or raise "
            "pretrain.model.overrides.context_length"
        )
    return None


class PretrainArgs(DistributedLMArgs):
    """Pretraining settings: the model, the per-epoch sample and the loss plot, plus every
    :class:`LMTrainArgs` field (whose defaults are the reference recipe). The windows
    (length, stride) come from the token files' producer (the tokenize stage)."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    """Architecture of the model trained from scratch."""
    checkpoint_every: int = operational(50, ge=0)
    """Write a resumable checkpoint every N steps (0 = only at epoch ends)."""
    sample_prompt: str | None = "Every effort moves you"
    """Prompt of the greedy sample generated after each epoch (None = no samples)."""
    sample_tokens: int = Field(50, ge=0)
    """New tokens in each sample."""
    plot: bool = True
    """Write ``loss.png`` (train/val loss against tokens seen)."""


GPT2Size = Literal["124M", "355M", "774M", "1558M"]


class LoadGPT2Args(Args):
    """Which base model the finetune stages start from (the pipeline's ``load_gpt2``)."""

    base_model: Literal["gpt2", "scratch"] = "gpt2"
    """'gpt2': download and import OpenAI's weights; 'scratch': use the pretrain
    checkpoint as the base of the finetune stages (explicit, recorded in runs)."""
    spam_size: GPT2Size = "124M"
    """GPT-2 release size the spam classifier starts from when base_model is 'gpt2'."""
    instruct_size: GPT2Size = "355M"
    """GPT-2 release size the instruction finetune starts from when base_model is 'gpt2'."""
    source: Literal["openai", "hf"] = "openai"
    """Where the GPT-2 weights come from: 'openai' = OpenAI's TensorFlow release (read with
    TensorFlow, as in the reference); 'hf' = the same weights in the Hugging Face
    safetensors layout (openai-community/gpt2*, no TensorFlow). Same downloader, mirror
    (``gpt2-hf/<size>/``) and checksum rules."""
    sample_prompt: str = "Every effort moves you"
    """Prompt of the greedy sample recorded for each base model."""
    sample_tokens: int = Field(25, ge=1)
    """New tokens in that sample."""

    def sizes(self) -> list[str]:
        """The GPT-2 sizes to import (none for 'scratch'), smallest first."""
        if self.base_model == "scratch":
            return []
        order = ["124M", "355M", "774M", "1558M"]
        return sorted({self.spam_size, self.instruct_size}, key=order.index)

    def folder(self, use: Literal["spam", "instruct"]) -> str:
        """The base checkpoint's folder name (relative to the stage folder) for a use."""
        if self.base_model == "scratch":
            return "scratch"
        return f"gpt2-{self.spam_size if use == 'spam' else self.instruct_size}"


class SpamArgs(Args):
    """Settings of the spam-classifier finetune (defaults: the reference recipe)."""

    trainable_blocks: int = Field(1, ge=0)
    """How many of the last transformer blocks are trained (the rest stay frozen).
    Default 1, or 0 with ``lora``."""
    train_final_norm: bool = True
    """Also train the final LayerNorm (the reference does). Default true, or false with
    ``lora``."""
    lora: LoraSetting = None
    """Low-rank adaptation instead of training weights outright (None = off): every base
    weight and the new head are frozen, adapters train (:class:`~gpt.args.LoraArgs`).
    The book's setting (appendix E) is ``lora = true``: rank 16, alpha 16, every linear
    layer including the class head — 2,666,528 trainable parameters on GPT-2 124M.
    ``trainable_blocks`` / ``train_final_norm``, when set too, still train those weights
    outright beside the adapters."""
    epochs: int = Field(5, ge=1)
    """Passes over the training split."""
    lr: float = Field(5e-5, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(8, ge=1)
    """Messages per optimizer step."""
    seed: int = 123
    """Seed of the head's initialisation, the batch order and dropout."""
    max_length: int | None = Field(None, ge=1)
    """Pad/truncate every message to this many tokens; None = the longest training
    message (capped at the model's context length)."""
    pool: Literal["last", "last_real"] = "last"
    """Which position's logits classify a message: ``last`` = the last position of the
    padded sequence (the reference), ``last_real`` = the message's last real token."""
    prefix_cache: bool = True
    """Compute the frozen prefix's activations once per split (True) or run the full
    model every step (False); both give the same losses."""
    eval_per_epoch: bool = True
    """Score loss and accuracy on every split after each epoch."""
    drop_rate: float = Field(0.0, ge=0, lt=1)
    """Dropout in the trainable blocks (the frozen prefix never uses dropout)."""
    drop_last: bool = True
    """Drop the last incomplete training batch (as the reference's loader does)."""
    cache_chunk: int = Field(64, ge=1)
    """Messages per forward pass while building the prefix cache / evaluating."""
    log_every: int = Field(0, ge=0)
    """Emit a ``step_loss`` metrics row every this many steps (0 = never)."""
    distributed: DistributedArgs = operational(default_factory=DistributedArgs)
    """How many processes train (``nproc = 1``: the calling process; more: under
    torchrun with DDP — ``strategy = "fsdp"`` is refused here, see
    :class:`~gpt.layout.DistributedArgs`). ``batch_size`` stays the global batch
    and must split evenly over the processes. :func:`finetune_classifier` launches
    itself on this layout (:func:`gpt.distributed.launch.relaunch`).
    Operational: with ``drop_rate = 0`` (the default), N processes give the per-step
    losses, weights and predictions of 1 process within ~1e-5 (float rounding), so the
    layout is not part of the cache key; with dropout, another layout gives an equally
    valid but different sample, served from the same cache entry."""

    @model_validator(mode="before")
    @classmethod
    def _lora_defaults(cls, data: Any) -> Any:
        """With ``lora`` on, nothing but the adapters trains unless asked."""
        if isinstance(data, dict) and data.get("lora") not in (None, False):
            data = {"trainable_blocks": 0, "train_final_norm": False, **data}
        return data

    @field_validator("distributed")
    @classmethod
    def _distributed_layout(cls, v: DistributedArgs, info: ValidationInfo) -> DistributedArgs:
        if "batch_size" in info.data:  # else batch_size itself was invalid
            v.check_batch(info.data["batch_size"], "batch_size")
        if v.strategy != "ddp":
            raise ValueError(
                f"strategy={v.strategy!r}: the spam finetune supports 'ddp' only (it trains "
                "a small suffix of the model)"
            )
        return v


class InstructArgs(DistributedLMArgs):
    """Settings of the instruction finetune: every :class:`~gpt.args.LMTrainArgs` field
    (defaults here: the reference recipe — AdamW 5e-5, batch 8, 2 epochs), plus the
    data and sample settings below."""

    epochs: int = Field(2, ge=1)
    """Passes over the training records."""
    lr: float = Field(5e-5, ge=0)
    """Peak learning rate of AdamW."""
    batch_size: int = Field(8, ge=1)
    """Sequences per optimizer step."""
    mask_prompt: bool = False
    """Also ignore the prompt (instruction + input + response header) in the loss (the
    reference does not)."""
    max_length: int | None = Field(1024, ge=2)
    """Truncate inputs/targets to this many tokens (None: the model's context length);
    never more than the context length."""
    length_bucketing: bool = False
    """Group sequences of similar length into batches (seeded; less padding)."""
    bucket_factor: int = Field(50, ge=1)
    """With bucketing: how many batches' worth of shuffled sequences are sorted together."""
    drop_rate: float = Field(0.0, ge=0, lt=1)
    """Dropout while finetuning."""
    drop_last: bool = True
    """Drop the last incomplete training batch (as the reference's loader does)."""
    sample_tokens: int = Field(35, ge=0)
    """Length of the greedy sample (the response to the first validation record)
    generated after each epoch (0 = no samples)."""
    lora: LoraSetting = None
    """Low-rank adaptation instead of training every weight (None = off): the base is
    frozen, adapters train (:class:`~gpt.args.LoraArgs`; ``true`` = rank 16, alpha 16,
    every linear layer); the checkpoint holds the adapter alone and names its base."""


class ExtractArgs(Args):
    """How test-split responses are generated (greedy, KV cache, stop at end-of-text)."""

    max_new_tokens: int = Field(256, ge=1)
    """Greedy tokens generated per example at most."""
    batch_size: int = Field(8, ge=1)
    """Prompts decoded together (a finished prompt's place goes to the next one)."""
    draft: DraftName = operational("prompt_lookup")
    """Tokens drafted for one forward pass to verify several at once: 'prompt_lookup'
    (n-grams of the prompt and the response so far) or 'none' (one token per pass).
    Greedy decoding returns the same responses either way (:mod:`gpt.decode`), so this
    is not part of the stage's key; only the speed depends on it."""
    draft_tokens: int = operational(8, ge=1, le=15)
    """Most tokens drafted per prompt and pass (fewer after rejected drafts)."""
    weights: WeightsKind = "fp32"
    """'int8' (opt-in, CPU): decode with int8 weights (:mod:`gpt.quantize`), faster but
    the responses change; the stage then states the cost on ``int8_check`` examples (share
    of greedy tokens identical to fp32, change of the judge's mean score) in its outputs
    and log. Part of the key (the responses differ)."""
    int8_check: int = Field(12, ge=0)
    """With ``weights = "int8"``: how many test examples (evenly spaced) are decoded with
    fp32 weights too, to measure int8's cost (0 = not measured). Ignored with fp32."""
