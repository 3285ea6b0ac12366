"""The downstream probe: what each model is good for, on a labelled text set available offline.

Every model (teacher, initial student, each trained scheme) is scored the same way, on the same
texts, split once:

- a *linear probe*: L2 logistic regression on standardized, attention-mask-weighted means of the
  frozen final hidden states. It reads what the pre-trained representation already separates,
  with nothing of the encoder trained;
- a *short fine-tune*: the encoder plus a new classification head, a few AdamW steps. It reads how
  quickly the weights become useful, which a frozen probe cannot see.

The data, the split and the fine-tune's randomness all come from ``probe.seed``, never
``base.seed``: the probe is a measuring instrument, and two experiments' students must be
measured on the same held-out texts to be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd.core import optim
from kd.core.params import Probe
from kd.core.runtime import autocast, use_training_attention
from kd.data.assets import bbc_offline_dir, hub_dataset
from kd.distill.losses import mean_pool


@dataclass(frozen=True)
class Labelled:
    """Texts with integer labels indexing ``classes``."""

    texts: list[str]
    labels: np.ndarray
    classes: list[str]

    def take(self, rows: np.ndarray) -> Labelled:
        return Labelled([self.texts[i] for i in rows], self.labels[rows], self.classes)


# --- data -------------------------------------------------------------------------------------


def decode(raw: bytes) -> str:
    """Text from bytes of unknown encoding: UTF-8 (a BOM dropped), else Windows-1252, else Latin-1.

    Most BBC files are ASCII/UTF-8; one holds a bare 0xA3 (£ in Latin-1). cp1252 agrees with
    Latin-1 on printable bytes and also maps 0x80-0x9F to the curly quotes and dashes that
    Windows-written files use; Latin-1 accepts any byte, so nothing is ever dropped or replaced.
    """
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def read_folder(folder: Path, key: str = "probe.folder") -> Labelled:
    """``folder/<class>/*.txt``: one class per sub-folder, one text per file, in sorted order."""
    if not folder.is_dir():
        raise SystemExit(f"{key}: {folder} is not a folder; lay it out as <class>/*.txt")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.txt")))
    if len(classes) < 2:
        raise SystemExit(
            f"{key}: {folder} has {len(classes)} class folder(s) with .txt files {classes}; a "
            "probe needs at least 2 (one sub-folder of .txt files per class)"
        )
    texts, labels = [], []
    for i, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.txt")):
            texts.append(decode(path.read_bytes()))
            labels.append(i)
    return Labelled(texts, np.asarray(labels, dtype=np.int64), classes)


def read_hf(cfg: Probe) -> Labelled:
    """``cfg.hf_splits`` of a Hugging Face dataset, concatenated; a ClassLabel column keeps its
    names, any other label values are sorted into classes."""
    from datasets import ClassLabel, concatenate_datasets

    parts = [hub_dataset("probe.hf_name", cfg.hf_name, cfg.hf_config, split,
                         "use probe.source: bbc_offline or folder") for split in cfg.hf_splits]
    ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    for key, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in ds.column_names:
            raise SystemExit(
                f"probe.{key} is {column!r}, but {cfg.hf_name} has no such column: its columns "
                f"are {ds.column_names}"
            )
    texts = ds[cfg.text_column]
    if not all(isinstance(t, str) for t in texts):
        raise SystemExit(f"probe.text_column {cfg.text_column!r} does not hold strings")
    feature, raw = ds.features[cfg.label_column], ds[cfg.label_column]
    if isinstance(feature, ClassLabel):
        classes, labels = list(feature.names), raw
    else:
        values = sorted(set(raw), key=str)
        classes = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
        labels = [index[v] for v in raw]
    return Labelled(list(texts), np.asarray(labels, dtype=np.int64), classes)


def clean(data: Labelled, where: str) -> Labelled:
    """Drop empty texts and exact duplicates (whitespace-normalised), then check every class can
    be split. BBC News repeats 100 of its 2,225 articles: kept twice, a copy in train and one in
    test would reward memorising. A text seen under two labels is dropped altogether."""
    first: dict[str, int] = {}
    conflicted: set[str] = set()
    for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
        key = " ".join(text.split())
        if not key:
            continue
        if key not in first:
            first[key] = i
        elif data.labels[first[key]] != label:
            conflicted.add(key)
    rows = np.asarray(sorted(i for k, i in first.items() if k not in conflicted), dtype=np.int64)
    out = data.take(rows)
    counts = np.bincount(out.labels, minlength=len(out.classes))
    thin = [c for c, n in zip(out.classes, counts, strict=True) if n < 2]
    if thin or len(out.classes) < 2:
        raise SystemExit(
            f"{where}: every class needs at least 2 distinct texts (one to train on, one to "
            f"test), and there must be 2 classes or more; too few in {thin or out.classes}"
        )
    return out


def stratified(
    labels: np.ndarray, fraction: float, rng: np.random.Generator, at_least: int, leave: int
) -> np.ndarray:
    """A sorted ``fraction`` of each class's rows (at least ``at_least``, leaving ``leave``),
    drawn with ``rng`` class by class, so the draw depends on the labels, the fraction and the
    seed alone."""
    chosen = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(rows) - leave, max(at_least, round(len(rows) * fraction)))
        chosen.append(rows[:k])
    return np.sort(np.concatenate(chosen))


def split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a seeded, stratified hold-out, fixed by ``probe.seed``; every
    class has a row on each side."""
    test = stratified(labels, test_fraction, np.random.default_rng([seed, 0]), 1, 1)
    return np.setdiff1d(np.arange(len(labels)), test), test


def load_split(cfg: Probe) -> tuple[Labelled, np.ndarray, np.ndarray]:
    """(data, train rows, test rows): :func:`load` then :func:`split`, the one split every model
    is scored on."""
    data = load(cfg)
    return (data, *split(data.labels, cfg.test_fraction, cfg.seed))


def load(cfg: Probe) -> Labelled:
    """The configured labelled set, cleaned, then stratified-subsampled to ``max_examples``."""
    if cfg.source == "bbc_offline":
        data, where = read_folder(bbc_offline_dir(), "probe.source bbc_offline"), "probe.source"
    elif cfg.source == "folder":
        data, where = read_folder(cfg.folder), "probe.folder"
    else:
        data, where = read_hf(cfg), "probe.hf_name"
    data = clean(data, where)
    if cfg.max_examples is not None and cfg.max_examples < len(data.texts):
        fraction = cfg.max_examples / len(data.texts)
        # Two rows per class at least, so the split still has one on each side.
        rng = np.random.default_rng([cfg.seed, 1])
        data = data.take(stratified(data.labels, fraction, rng, 2, 0))
    return data


# --- models -----------------------------------------------------------------------------------


def tokenize(tokenizer, texts: list[str], max_seq_length: int) -> list[list[int]]:
    """Token ids per text, with the model's special tokens, truncated; padded later per batch."""
    return tokenizer(texts, truncation=True, max_length=max_seq_length)["input_ids"]


def pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest row."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask


def _batches(ids: list[list[int]], batch_size: int):
    """Row indices in batches of similar length (less padding), each batch in length order."""
    order = np.argsort([len(r) for r in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.inference_mode()
def features(
    model: nn.Module,
    ids: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """Mask-weighted mean of the final hidden states, one fp32 row per text, in input order."""
    model.eval()
    out = np.empty((len(ids), model.config.hidden_size), dtype=np.float32)
    for rows in _batches(ids, batch_size):
        input_ids, mask = pad([ids[i] for i in rows], pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with autocast(device, precision):
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        # Mean over real tokens only: padding must not move a text's feature with its batch.
        out[rows] = mean_pool(hidden.float(), mask).cpu().numpy()
    return out


def pad_token_id(tokenizer) -> int:
    # Padding is masked out of every feature, so any id will do when the tokenizer has none.
    return tokenizer.pad_token_id or 0


def linear_accuracy(
    model: nn.Module,
    ids: list[list[int]],
    pad_id: int,
    labels: np.ndarray,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    cfg: Probe,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """The linear probe's held-out accuracy on ``model``'s frozen :func:`features` of ``ids``."""
    x = features(model.to(device), ids, pad_id, cfg.batch_size, device, precision)
    return linear_probe(
        x[train_rows], labels[train_rows], x[test_rows], labels[test_rows], cfg.linear_c,
        cfg.linear_max_iter,
    )


def linear_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float,
    max_iter: int,
) -> float:
    """Held-out accuracy of an L2 logistic regression on standardized features.

    Standardizing first makes one ``c`` fit every model: the raw feature scales of a teacher and
    a random student differ by orders of magnitude. lbfgs has no randomness to seed.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(x_train, y_train)
    return float(clf.score(x_test, y_test))


def _check_loaded(info: dict, model_dir: Path, new_ok: tuple[str, ...]) -> None:
    # A mis-named checkpoint would load as a random encoder and score as one, silently.
    missing = [k for k in info.get("missing_keys", []) if not any(s in k for s in new_ok)]
    if missing:
        raise SystemExit(
            f"{model_dir}: the encoder did not load from the checkpoint ({len(missing)} "
            f"weights missing, e.g. {missing[:3]}): is it a masked-LM model saved by this pipeline?"
        )


def load_encoder(model_dir: Path):
    """(encoder, tokenizer) saved in ``model_dir``; the MLM head is dropped, the pooler unused."""
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(model_dir, output_loading_info=True)
    _check_loaded(info, model_dir, ("pooler.",))
    return model, AutoTokenizer.from_pretrained(model_dir)


@dataclass
class Finetuned:
    accuracy: float
    losses: list[float]  # training loss per step


def finetune(
    model_dir: Path,
    train_ids: list[list[int]],
    train_labels: np.ndarray,
    test_ids: list[list[int]],
    test_labels: np.ndarray,
    num_labels: int,
    pad_id: int,
    cfg: Probe,
    device: torch.device,
    precision: str = "fp32",
    attention: str = "auto",
) -> Finetuned:
    """Held-out accuracy after ``cfg.finetune_steps`` AdamW steps on encoder + new head.

    The encoder loads from the masked-LM checkpoint; the classifier (and BERT's pooler, which a
    masked LM does not have) start from ``cfg.seed``. Linear warmup then linear decay to zero,
    gradients clipped at 1. The checkpoint on disk is only read.

    The head reads the [CLS] state, which masked-position distillation never trains: a student's
    varies little across texts (per-dimension std ~0.02 at norm ~17 for the default students), so
    a short fine-tune may stay at the majority class where the linear probe, which standardizes
    mean-pooled states, still separates the topics. That gap is itself a finding, not a bug.
    """
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed)  # the new head's init and dropout
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, output_loading_info=True
    )
    _check_loaded(info, model_dir, ("pooler.", "classifier.", "score."))
    model.to(device).train()
    use_training_attention(model, attention, device)
    opt = optim.adamw(model, cfg.finetune_lr, cfg.finetune_weight_decay)
    sched = get_linear_schedule_with_warmup(opt, cfg.finetune_warmup_steps, cfg.finetune_steps)
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    order: list[int] = []
    losses = []
    for _ in range(cfg.finetune_steps):
        if len(order) < cfg.finetune_batch_size:  # a fresh epoch's order when this one runs out
            order += torch.randperm(len(train_ids), generator=g).tolist()
        rows, order = order[: cfg.finetune_batch_size], order[cfg.finetune_batch_size :]
        input_ids, mask = pad([train_ids[i] for i in rows], pad_id)
        with autocast(device, precision):
            out = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                labels=labels[rows].to(device),
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())  # a sync point per step; steps are few and slow anyway

    model.eval()
    predicted = np.empty(len(test_ids), dtype=np.int64)
    with torch.inference_mode():
        for rows in _batches(test_ids, cfg.batch_size):
            input_ids, mask = pad([test_ids[i] for i in rows], pad_id)
            with autocast(device, precision):
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            predicted[rows] = logits.argmax(-1).cpu().numpy()
    return Finetuned(float((predicted == test_labels).mean()), losses)


def probe_model(
    model_dir: Path,
    data: Labelled,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    cfg: Probe,
    device: torch.device,
    precision: str = "fp32",
    attention: str = "auto",
) -> tuple[dict[str, float | None], list[float]]:
    """One model's linear-probe and fine-tune accuracies (None when ``finetune_steps`` is 0),
    and the fine-tune's loss per step."""
    model, tokenizer = load_encoder(model_dir)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.max_seq_length > limit:
        raise SystemExit(
            f"probe.max_seq_length ({cfg.max_seq_length}) is longer than {model_dir}'s "
            f"{limit} positions: lower it"
        )
    ids = tokenize(tokenizer, data.texts, cfg.max_seq_length)
    pad_id = pad_token_id(tokenizer)
    y = data.labels
    result: dict[str, float | None] = {
        "linear_acc": linear_accuracy(
            model, ids, pad_id, y, train_rows, test_rows, cfg, device, precision
        ),
        "finetune_acc": None,
    }
    del model
    losses: list[float] = []
    if cfg.finetune_steps:
        tuned = finetune(
            model_dir,
            [ids[i] for i in train_rows],
            y[train_rows],
            [ids[i] for i in test_rows],
            y[test_rows],
            len(data.classes),
            pad_id,
            cfg,
            device,
            precision,
            attention,
        )
        result["finetune_acc"], losses = tuned.accuracy, tuned.losses
    return result, losses
