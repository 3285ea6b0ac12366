"""Typed, validated view of params.yaml.

Every stage calls :func:`load_params` first, so a misspelt key, a wrong type or an impossible
combination fails before any work starts, with a message that names the key and the fix.
The models mirror params.yaml section by section; `extra="forbid"` everywhere, because a silently
ignored key is a silently wrong experiment.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
# numpy's legacy seeding (np.random.seed, kd/core/runtime.py) takes 0 <= seed < 2**32; every seed
# shares that bound so that a seed params accept is one every generator accepts.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def _not_empty(fix: str) -> BeforeValidator:
    """Refuse an empty list before a union tries its other branches (one error, not one per
    branch): an empty list of layers would reach max() or a loop over nothing."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError(f"is an empty list: {fix}")
        return value

    return BeforeValidator(check)


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank: give it some text, or remove it from the list")
    return value


Text = Annotated[str, AfterValidator(_text)]


def _held_out(fraction: float) -> float:
    if fraction > 0.5:
        raise ValueError(
            "holds out more than half of the documents, which leaves a training split smaller "
            "than the test split: use at most 0.5 (0.05 for the corpus, 0.2 for the probe are "
            "the defaults)"
        )
    return fraction


# A held-out share: at most half, so the training split is never the smaller one.
TestFraction = Annotated[float, Field(gt=0, lt=1), AfterValidator(_held_out)]

# The loss terms a scheme may weight, and the arguments each uses. kd/distill/losses.py implements them.
LOSS_TERMS = (
    "embedding",
    "hidden",
    "attention",
    "logit",
    "hidden_cosine",
    "minilm_attention",
    "minilm_value",
    "rkd_distance",
    "rkd_angle",
    "activation_boundary",
)
# Every term but the logit term reads intermediate representations (a "multi-loss" arm).
INTERMEDIATE_TERMS = tuple(t for t in LOSS_TERMS if t != "logit")


def _check_terms(terms: dict[str, float], known: tuple[str, ...], what: str, listed: str
                 ) -> dict[str, float]:  # fmt: skip
    """A scheme's ``terms``: every name among ``known``, at least one positive weight."""
    unknown = sorted(set(terms) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}: {listed} are {list(known)}")
    if not terms:
        raise ValueError(f"lists no term: weight at least one of {list(known)}")
    if not any(w > 0 for w in terms.values()):
        raise ValueError("every term weight is 0: give at least one term a positive weight")
    return terms


# The params reads being recorded, if any (see "Which keys a stage reads" at the end).
_trace: Trace | None = None


class Strict(BaseModel):
    # allow_inf_nan=False: YAML's .inf and .nan parse as floats, and an infinite learning rate or
    # epoch count would otherwise pass every bound here and fail only inside training.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Reads are recorded only while a trace is on (see "Which keys a stage reads" below).
    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _trace is not None and name in type(self).model_fields:
            _trace.read(self, name, value)
        return value

    def model_dump(self, **kwargs) -> dict[str, Any]:
        if _trace is not None:
            _trace.read_all(self)
        return super().model_dump(**kwargs)


class Base(Strict):
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    threads: NonNegInt = 0
    nproc: PositiveInt = 1
    # How the processes share the training (kd/training/loop.py): whole copies (ddp) or shards
    # (fsdp, kd/training/sharded.py); and whether the frozen teacher is sharded too.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    shard_teacher: bool = False

    @model_validator(mode="after")
    def _check(self) -> Base:
        if self.shard_teacher and self.parallel != "fsdp":
            raise ValueError(
                "base.shard_teacher: true shards the teacher with FSDP2, which base.parallel="
                f"{self.parallel} does not run: set base.parallel: fsdp, or shard_teacher: false"
            )
        return self


class Paths(Strict):
    params_ok: Path = Path("data/params.ok")
    inputs: Path = Path("data/inputs.json")
    corpus: Path = Path("data/corpus")
    tokens: Path = Path("data/tokens")
    teacher: Path = Path("data/teacher")
    student_init: Path = Path("data/student_init")
    students: Path = Path("data/students")
    checkpoints: Path = Path("data/checkpoints")
    metrics: Path = Path("data/metrics")
    train: Path = Path("data/train")
    eval: Path = Path("data/eval")
    probe: Path = Path("data/probe")
    report: Path = Path("data/report")
    distilled: Path = Path("data/distilled")
    quantize: Path = Path("data/quantize")
    causal: Path = Path("data/causal")
    plots: Path = Path("data/plots")


class Corpus(Strict):
    seed: Seed = 0
    source: Literal["wiki_offline", "hf", "text"] = "wiki_offline"
    hf_name: str = "wikimedia/wikipedia"
    hf_config: str | None = "20231101.en"
    hf_split: str = "train"
    hf_text_column: str = "text"
    text_path: Path | None = None
    text_column: str = "text"
    n_docs: PositiveInt | None = None
    n_words: PositiveInt | None = None
    test_fraction: TestFraction = 0.05
    min_chars: NonNegInt = 32

    @model_validator(mode="after")
    def _check(self) -> Corpus:
        if self.n_docs is not None and self.n_words is not None:
            raise ValueError(
                "corpus.n_docs and corpus.n_words are both set: choose one way to size the "
                "sample (set the other to null)"
            )
        if self.source == "text" and self.text_path is None:
            raise ValueError(
                "corpus.source is 'text' but corpus.text_path is null: point it at a .txt, "
                ".jsonl or .parquet file, or a folder of them"
            )
        if self.source == "hf" and self.n_docs is None and self.n_words is None:
            raise ValueError(
                "corpus.source is 'hf' (streamed) but neither corpus.n_docs nor corpus.n_words "
                "is set: a hub dataset is too large to take whole; set one of them"
            )
        return self


class Tokenize(Strict):
    teacher_tokenizer: str | None = None
    student_tokenizer: str | None = None
    max_seq_length: Annotated[int, Field(ge=8, le=4096)] = 128
    mlm_probability: Fraction = 0.15
    mask_seed: Seed = 1234
    num_proc: PositiveInt = 1


class Teacher(Strict):
    source: str = "default"
    seed: Seed = 0
    adapt_steps: NonNegInt = 400
    lr: PositiveFloat = 6e-4
    batch_size: PositiveInt = 16
    warmup_steps: NonNegInt = 30
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    eval_batches: PositiveInt = 20


class Student(Strict):
    checkpoint: str | None = None
    hidden_size: PositiveInt = 312
    num_hidden_layers: PositiveInt = 4
    num_attention_heads: PositiveInt = 12
    intermediate_size: PositiveInt = 1200

    @model_validator(mode="after")
    def _check(self) -> Student:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"student.hidden_size ({self.hidden_size}) is not divisible by "
                f"student.num_attention_heads ({self.num_attention_heads}): pick a head count "
                "that divides the hidden size"
            )
        return self


def _attribution_is_logged(t: Train | CausalTrain) -> None:
    # Attributions are written in the logged rows, so they must fall on logged steps.
    if t.attribution_every % t.log_every:
        s = t.section
        raise ValueError(
            f"{s}.attribution_every={t.attribution_every} is not a multiple of "
            f"{s}.log_every={t.log_every}: attributions are written with the logged "
            f"rows (use e.g. {t.log_every * 5}, or 0 to turn them off)"
        )


def sharding_problem(t: Train | CausalTrain, base: Base) -> str | None:
    """Why a training section cannot run under ``base.parallel: fsdp`` (None when it can)."""
    if base.parallel == "fsdp" and t.attribution_every:
        s = t.section
        return (f"{s}.attribution_every={t.attribution_every} takes each term's own gradient "
                "with torch.autograd.grad, which FSDP2's sharded parameters do not take part in "
                f"(base.parallel=fsdp): set {s}.attribution_every: 0, or base.parallel: ddp")
    return None


def batch_split_problem(t: Train | CausalTrain, nproc: int) -> str | None:
    """Why a training section's global batch cannot be split over ``nproc`` processes (and
    into its micro-batches), or None. The MLM gate checks ``train``, the causal gate
    ``causal.train``: each pipeline is refused only for the section it reads."""
    s = t.section
    if t.batch_size % nproc:
        return (f"{s}.batch_size={t.batch_size} cannot be split evenly over base.nproc={nproc} "
                "processes: make the batch size a multiple of the process count")
    share = t.batch_size // nproc
    if t.micro_batch_size is not None and share % t.micro_batch_size:
        divisors = [d for d in range(1, share + 1) if share % d == 0]
        return (f"{s}.micro_batch_size={t.micro_batch_size} does not divide the {share} rows "
                f"each of base.nproc={nproc} process(es) gets per step ({s}.batch_size="
                f"{t.batch_size}): pick one of {divisors}, or null for no accumulation")
    return None


class Train(Strict):
    """The MLM arms' optimisation, read by the one training loop (kd/training/loop.py)."""

    section: ClassVar[str] = "train"  # where it lives in params.yaml, for messages
    batch_size: PositiveInt = 16
    micro_batch_size: PositiveInt | None = None
    epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = None
    lr: PositiveFloat = 5e-4
    warmup_steps: NonNegInt = 30
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    max_grad_norm: PositiveFloat = 1.0
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    masking: Literal["dynamic", "static"] = "dynamic"
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 100
    attribution_every: NonNegInt = 50

    @model_validator(mode="after")
    def _check(self) -> Train:
        _attribution_is_logged(self)
        return self


class Schedule(Strict):
    """A value over training (kd/distill/schedules.py): ``constant`` keeps ``start``; ``linear`` goes
    from ``start`` at the first step to ``end`` at the last. ``start`` defaults to the value the
    scheme already gives (its ``temperature``, or the term's weight in ``terms``)."""

    kind: Literal["constant", "linear"] = "constant"
    start: Annotated[float, Field(ge=0)] | None = None
    end: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if self.kind == "linear" and self.end is None:
            raise ValueError("a linear schedule needs `end` (the value at the last step)")
        if self.kind == "constant" and self.end is not None:
            raise ValueError("a constant schedule has no `end`: remove it, or set kind: linear")
        return self


class Scheme(Strict):
    """A named, weighted set of loss terms and the options those terms take."""

    terms: dict[str, Annotated[float, Field(ge=0)]]
    temperature: PositiveFloat = 1.0
    logit_positions: Literal["masked", "all"] = "masked"
    attention_target: Literal["probs", "scores"] = "probs"
    projection: Literal["per_layer", "shared"] = "per_layer"
    layer_map: Annotated[
        Literal["uniform"] | list[PositiveInt],
        _not_empty("list one 1-based teacher layer per student layer, or use uniform"),
    ] = "uniform"
    ab_margin: PositiveFloat = 1.0  # μ of the activation_boundary term (Heo et al. 2019)
    temperature_schedule: Schedule | None = None  # null = constant `temperature`
    weight_schedules: dict[str, Schedule] = Field(default_factory=dict)  # term -> schedule

    @field_validator("terms")
    @classmethod
    def _known_terms(cls, terms: dict[str, float]) -> dict[str, float]:
        return _check_terms(terms, LOSS_TERMS, "loss term(s)", "the known terms")

    @model_validator(mode="after")
    def _check_schedules(self) -> Scheme:
        loose = sorted(set(self.weight_schedules) - set(self.terms))
        if loose:
            raise ValueError(
                f"weight_schedules names {loose}, which this scheme's `terms` does not list: "
                f"add them to `terms` (their weight there is the schedule's default start) or "
                f"drop their schedules"
            )
        t = self.temperature_schedule
        if t is not None and (t.start == 0 or t.end == 0):
            raise ValueError("temperature_schedule: a temperature must stay > 0")
        if not self.active_terms:
            raise ValueError(
                "weight_schedules hold every term at 0 for the whole run, so nothing would be "
                "trained: give one term a positive `start` or `end`"
            )
        return self

    @property
    def active_terms(self) -> dict[str, float]:
        """The computed terms with their starting weights: a positive weight in ``terms``, or a
        weight schedule that is positive somewhere."""
        out = {}
        for k, v in self.terms.items():
            sched = self.weight_schedules.get(k)
            start = v if sched is None or sched.start is None else sched.start
            if start > 0 or (sched is not None and (sched.end or 0) > 0):
                out[k] = start
        return out

    @property
    def uses_intermediate(self) -> bool:
        return any(t in self.active_terms for t in INTERMEDIATE_TERMS)


class Loss(Strict):
    scheme: str = "multi"
    arms: list[str] = Field(default_factory=lambda: ["logit", "multi"], min_length=1)
    schemes: dict[str, Scheme]

    @model_validator(mode="after")
    def _check(self) -> Loss:
        known = sorted(self.schemes)
        for arm in self.arms:
            if arm not in self.schemes:
                raise ValueError(
                    f"loss.arms names '{arm}', which is not a scheme: define it under "
                    f"loss.schemes or use one of {known}"
                )
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"loss.arms lists an arm twice: {self.arms}")
        if self.scheme not in self.arms:
            # One stage per arm (DVC foreach); a scheme outside the arms would need stages that
            # only write a note when it is an arm, so it joins the arms instead.
            how = (f"add it to the arms: -S 'loss.arms=[{','.join([*self.arms, self.scheme])}]'"
                   if self.scheme in self.schemes else
                   f"it is not a scheme either: define it under loss.schemes (which has "
                   f"{known}) and add it to loss.arms, or use one of the arms")
            raise ValueError(f"loss.scheme is '{self.scheme}', which is not one of loss.arms "
                             f"{self.arms}: {how}")
        return self


class Evaluate(Strict):
    batch_size: PositiveInt = 16
    train_batches: PositiveInt = 16
    test_batches: PositiveInt | None = None
    lstsq_batches: PositiveInt = 8


class Probe(Strict):
    """The downstream probe (kd/probe/probe.py): a labelled text set, one fixed split, two measures."""

    source: Literal["bbc_offline", "hf", "folder"] = "bbc_offline"
    folder: Path | None = None  # <class>/*.txt (source: folder)
    hf_name: str | None = None  # a hub dataset or a local dataset folder (source: hf)
    hf_config: str | None = None
    hf_splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    text_column: str = "text"
    label_column: str = "label"
    max_examples: Annotated[int, Field(ge=4)] | None = None  # stratified subsample; None = all
    test_fraction: TestFraction = 0.2
    seed: Seed = 0  # the split, the subsample and the fine-tune; never base.seed
    max_seq_length: Annotated[int, Field(ge=8, le=4096)] = 128
    batch_size: PositiveInt = 64  # texts per forward for features and held-out predictions
    linear_c: PositiveFloat = 1.0  # inverse L2 strength of the logistic regression
    linear_max_iter: PositiveInt = 1000
    finetune_steps: NonNegInt = 40  # 0 = linear probe only
    finetune_batch_size: PositiveInt = 16
    finetune_lr: PositiveFloat = 1e-4
    finetune_warmup_steps: NonNegInt = 4
    finetune_weight_decay: Annotated[float, Field(ge=0)] = 0.01

    @model_validator(mode="after")
    def _check(self) -> Probe:
        if self.source == "folder" and self.folder is None:
            raise ValueError(
                "probe.source is 'folder' but probe.folder is null: point it at a folder laid "
                "out as <class>/*.txt"
            )
        if self.source == "hf" and not self.hf_name:
            raise ValueError(
                "probe.source is 'hf' but probe.hf_name is null: name a Hugging Face dataset "
                "(e.g. SetFit/bbc-news) or a local dataset folder"
            )
        if self.finetune_steps and self.finetune_warmup_steps >= self.finetune_steps:
            raise ValueError(
                f"probe.finetune_warmup_steps ({self.finetune_warmup_steps}) must be below "
                f"probe.finetune_steps ({self.finetune_steps}): lower the warmup"
            )
        return self


class Quantize(Strict):
    dtype: Literal["qint8"] = "qint8"
    batch_size: PositiveInt = 16
    test_batches: PositiveInt = 8
    latency_batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 16], min_length=1)
    latency_seq_length: PositiveInt | None = None  # null: whole blocks (tokenize.max_seq_length)
    warmup_batches: NonNegInt = 3
    latency_batches: PositiveInt = 20
    probe: bool = True  # also the linear probe (probe: section) of fp32 and int8


# --- The causal-LM family (causal/dvc.yaml's causal_* stages, kd/causal) ---------------------

CAUSAL_TERMS = ("logit", "hidden", "attention", "embedding")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl")


class CausalStudent(Strict):
    """The causal student: a subset of the teacher's blocks (``layers``), or a random model of
    the teacher's class with some config fields changed (``config``)."""

    layers: Annotated[
        PositiveInt | list[PositiveInt] | None,
        _not_empty("give a count of blocks, or at least one 1-based teacher block number"),
    ] = 15
    config: dict[str, PositiveInt] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> CausalStudent:
        if (self.layers is None) == (self.config is None):
            raise ValueError(
                "set exactly one of causal.student.layers (the teacher's blocks it keeps) and "
                "causal.student.config (a random student of the teacher's class): set the "
                "other to null"
            )
        if isinstance(self.layers, list) and self.layers != sorted(set(self.layers)):
            raise ValueError(
                f"causal.student.layers {self.layers} must be increasing 1-based teacher "
                "block numbers, each once"
            )
        return self


class CausalScheme(Strict):
    """A causal arm: weights of the four terms and the logit term's divergence."""

    terms: dict[str, Annotated[float, Field(ge=0)]]
    divergence: Literal[DIVERGENCES] = "forward_kl"  # type: ignore[valid-type]
    beta: Annotated[float, Field(gt=0, lt=1)] = 0.5  # jsd's mixture weight (GKD)
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.1  # the skew KLs' skew (DistiLLM)
    temperature: PositiveFloat = 1.0
    layer_map: Annotated[
        Literal["auto"] | list[PositiveInt],
        _not_empty("list one 1-based teacher block per student block, or use auto"),
    ] = "auto"
    # The embedding and hidden terms: TinyBERT's MSE over the teacher's mean square, or plain
    representation_loss: Literal["relative_mse", "mse"] = "relative_mse"

    @field_validator("terms")
    @classmethod
    def _known_terms(cls, terms: dict[str, float]) -> dict[str, float]:
        return _check_terms(terms, CAUSAL_TERMS, "causal loss term(s)", "the causal terms")

    @property
    def uses_intermediate(self) -> bool:
        return any(self.terms.get(t, 0) > 0 for t in CAUSAL_TERMS[1:])


class CausalTrain(Strict):
    """The causal arms' optimisation: the same loop and the same keys as ``train``, plus GKD's
    on-policy rows. ``max_steps`` counts steps (no epochs: the default is one pass)."""

    section: ClassVar[str] = "causal.train"
    batch_size: PositiveInt = 4
    max_steps: PositiveInt = 240
    lr: PositiveFloat = 1e-4
    warmup_steps: NonNegInt = 6
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: PositiveFloat = 1.0
    log_every: PositiveInt = 5
    checkpoint_every: PositiveInt = 20
    onpolicy: Annotated[float, Field(ge=0, le=1)] = 0.0  # GKD's λ: share of rows the student writes
    onpolicy_prompt: Annotated[int, Field(ge=1)] = 32  # tokens of a row kept as its prompt
    onpolicy_temperature: Annotated[float, Field(ge=0)] = 1.0  # 0 = greedy
    micro_batch_size: PositiveInt | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    attribution_every: NonNegInt = 60

    @model_validator(mode="after")
    def _check(self) -> CausalTrain:
        _attribution_is_logged(self)
        return self


class CausalEvaluate(Strict):
    batch_size: PositiveInt = 4
    prompts: list[Text] = Field(min_length=1)
    max_new_tokens: PositiveInt = 24


class CausalCache(Strict):
    """The teacher cache's own keys (causal_cache; its k is causal.top_k, which the arms read
    too): how it is computed and stored, never what it holds (kd/causal/cache.py)."""

    batch_size: PositiveInt = 8  # blocks per teacher forward
    shard_blocks: PositiveInt = 128  # blocks per shard: what a kill can lose at most
    logprobs: Literal["float16", "float32"] = "float16"  # the stored log-probabilities' type

    @model_validator(mode="after")
    def _check(self) -> CausalCache:
        if self.batch_size > self.shard_blocks:
            raise ValueError(
                f"causal.cache.batch_size={self.batch_size} is more than a shard's "
                f"causal.cache.shard_blocks={self.shard_blocks} blocks, and a shard is computed "
                "in batches of its own rows: lower the batch size or raise shard_blocks"
            )
        return self


class Causal(Strict):
    teacher: str = "default"
    block_size: Annotated[int, Field(ge=8, le=4096)] = 128
    train_blocks: PositiveInt | None = 960  # the first blocks of the train split; null = all
    test_blocks: PositiveInt | None = 32
    top_k: NonNegInt = 64  # the teacher cache's k; 0 = no cache, the logit term runs the teacher
    cache: CausalCache = CausalCache()
    probe_examples: Annotated[int, Field(ge=0)] = 500  # texts of the probe section's set; 0 = no probe
    student: CausalStudent = CausalStudent()
    train: CausalTrain = CausalTrain()
    arms: list[str] = Field(default_factory=lambda: ["logit", "multi"], min_length=1)
    # The arm whose student is the causal study's result (exported and registered by
    # causal_report), as loss.scheme is the MLM family's; null: the first arm.
    scheme: str | None = None
    schemes: dict[str, CausalScheme]
    evaluate: CausalEvaluate

    @model_validator(mode="after")
    def _check(self) -> Causal:
        for arm in self.arms:
            if arm not in self.schemes:
                raise ValueError(
                    f"causal.arms names '{arm}', which is not a scheme: define it under "
                    f"causal.schemes or use one of {sorted(self.schemes)}"
                )
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"causal.arms lists an arm twice: {self.arms}")
        # Unlike loss.scheme, no stage trains a causal scheme that is not an arm.
        if self.scheme is not None and self.scheme not in self.arms:
            raise ValueError(
                f"causal.scheme is '{self.scheme}', which is not a causal arm: add it to "
                f"causal.arms or use one of {self.arms} (null: the first)"
            )
        if 0 < self.probe_examples < 4:
            raise ValueError(
                f"causal.probe_examples={self.probe_examples} cannot be split into train and "
                "test texts per class: use at least 4 (500 by default), or 0 for no probe"
            )
        t = self.train
        if self.train_blocks is not None and self.train_blocks < t.batch_size:
            raise ValueError(
                f"causal.train_blocks={self.train_blocks} is fewer than one step's "
                f"causal.train.batch_size={t.batch_size} blocks: raise causal.train_blocks (or "
                "null for every block), or lower the batch size"
            )
        if t.onpolicy and t.onpolicy_prompt >= self.block_size:
            raise ValueError(
                f"causal.train.onpolicy_prompt={t.onpolicy_prompt} leaves the student nothing "
                f"to write in blocks of causal.block_size={self.block_size}: use a shorter prompt"
            )
        if self.top_k:
            hot = [a for a in self.arms if self.schemes[a].terms.get("logit", 0) > 0
                   and self.schemes[a].temperature != 1.0]
            if hot:
                raise ValueError(
                    f"causal arm(s) {hot} soften the logits (temperature != 1), but the teacher "
                    f"cache holds its distribution at T = 1: set their temperature to 1.0, or "
                    f"causal.top_k: 0 to run the teacher at every step"
                )
        return self

    @property
    def headline(self) -> str:
        """The arm whose student is exported: causal.scheme, or the first arm."""
        return self.scheme or self.arms[0]


class Params(Strict):
    base: Base = Base()
    paths: Paths = Paths()
    corpus: Corpus = Corpus()
    tokenize: Tokenize = Tokenize()
    teacher: Teacher = Teacher()
    student: Student = Student()
    train: Train = Train()
    loss: Loss
    evaluate: Evaluate = Evaluate()
    probe: Probe = Probe()
    quantize: Quantize = Quantize()
    causal: Causal | None = None

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        # Checks that need two sections; each names both keys.
        split_problem = batch_split_problem(self.train, self.base.nproc)
        if split_problem:
            raise ValueError(split_problem)
        latency = self.quantize.latency_seq_length
        if latency is not None and latency > self.tokenize.max_seq_length:
            raise ValueError(
                f"quantize.latency_seq_length={self.quantize.latency_seq_length} is longer than "
                f"the blocks the models are trained and scored on (tokenize.max_seq_length="
                f"{self.tokenize.max_seq_length}): set it to at most that"
            )
        return self


class ParamsError(SystemExit):
    """A params.yaml problem, reported as one readable paragraph; an entry point run through
    :func:`kd.core.cli.run` (every stage) prints it and exits with status 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _format(err: ValidationError, path: Path) -> str:
    lines = [f"{path} is not valid ({err.error_count()} problem(s)); nothing was run:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg = (f"must be a finite number, got {e.get('input')!r}: YAML's .inf and .nan are "
                   "not values a run can use; give a number")
        elif e["type"] == "extra_forbidden":
            msg = "unknown key: check its spelling against params.yaml's documented keys, or remove it"
        elif e["type"] == "missing":
            msg = "required key is missing: add it (see the defaults in the repository's params.yaml)"
        elif not isinstance(e.get("input"), dict | list):  # a whole section is no help to quote
            msg = f"{msg} (got {e.get('input')!r})"
        # A rule across sections has no one key: its message names every key it involves.
        lines.append(f"  - {key}: {msg}" if key else f"  - {msg}")
    return "\n".join(lines)


def parse_params(raw: dict, source: Path | str = "params.yaml") -> Params:
    """Validate an already-loaded params mapping; raises :class:`ParamsError`."""
    try:
        params = Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format(err, Path(source))) from None
    if _trace is None and os.environ.get(TRACE_ENV):
        start_trace(Path(os.environ[TRACE_ENV]))
    if _trace is not None:
        _trace.index(params)
    return params


def _duplicate_key(node: yaml.Node, prefix: str = "") -> str | None:
    """The first key given twice in one mapping of the composed YAML ``node``, as a sentence.

    PyYAML keeps the last value silently while DVC's own parser refuses the file, so the gate
    and DVC would disagree about what params.yaml says."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat
                continue
            if key in seen:
                return (f"the key {prefix}{key} is given twice (lines {seen[key]} and {line}); "
                        "YAML would keep only the last silently and DVC refuses the file: "
                        "delete one of them, or merge them into one")  # fmt: skip
            seen[key] = line
            found = _duplicate_key(value_node, f"{prefix}{key}.")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, f"{prefix}{i}.")
            if found:
                return found
    return None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate params.yaml (relative to the working directory, where DVC runs stages)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the repository root, where params.yaml is")
    text = path.read_text()
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if duplicate:
        raise ParamsError(f"{path}: {duplicate}")
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, path)


# --- Which keys a stage reads --------------------------------------------------------------------
# DVC reruns a stage when a params key it declares changes, so a key a stage reads without
# declaring it is a change that silently reruns nothing. With KD_TRACE_PARAMS set to a folder,
# every process records the dotted keys it reads (a field's value, or a whole section through
# model_dump) and writes them there on exit, named after DVC's DVC_STAGE; the DAG-contract test
# (tests/test_dag_contract.py) compares them with each stage's `params:` in dvc.yaml.

TRACE_ENV = "KD_TRACE_PARAMS"


class Trace:
    """The keys read from validated params in this process."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self._prefix: dict[int, str] = {}  # id(model) -> its dotted key, "" for the root

    def index(self, model: Strict, prefix: str = "") -> None:
        """Remember where every model in ``model``'s tree sits in params.yaml."""
        self._prefix[id(model)] = prefix
        for name in type(model).model_fields:
            value = object.__getattribute__(model, name)
            if isinstance(value, Strict):
                self.index(value, f"{prefix}{name}.")
            elif isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(item, Strict):
                        self.index(item, f"{prefix}{name}.{key}.")

    def read(self, model: Strict, name: str, value: Any) -> None:
        prefix = self._prefix.get(id(model))
        # A section, or a mapping of sections (loss.schemes): what counts is what is read in it.
        container = isinstance(value, Strict) or (
            isinstance(value, dict) and any(isinstance(v, Strict) for v in value.values())
        )
        if prefix is not None and not container:
            self.keys.add(prefix + name)

    def read_all(self, model: Strict) -> None:
        prefix = self._prefix.get(id(model))
        if prefix:
            self.keys.add(prefix.removesuffix("."))
        elif prefix == "":
            self.keys.update(type(model).model_fields)

    def dump(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        stage = os.environ.get("DVC_STAGE", "no-stage")
        record = {"stage": stage, "argv": sys.argv, "keys": sorted(self.keys)}
        name = f"{stage.replace('/', '_')}-{os.getpid()}.json"
        (folder / name).write_text(json.dumps(record, indent=1) + "\n")


def start_trace(folder: Path | None = None) -> Trace:
    """Record params reads from now on; with ``folder``, write them there when the process exits."""
    global _trace
    _trace = Trace()
    if folder is not None:
        atexit.register(_trace.dump, folder)
    return _trace


def stop_trace() -> None:
    global _trace
    _trace = None
