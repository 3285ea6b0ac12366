"""What the models' configs and tokenizers can tell before any weights are read.

Each model named in params (the teacher, a student checkpoint, the tokenizers) is opened by its
config and tokenizer only: fast, and enough to refuse a folder that holds no weights or a cut
weights file (its header and size tell, kd/data/weights.py), a tokenizer that is not the model's,
a sequence longer than the model's positions, or a layer map or head count a scheme cannot use.
The last two only params.yaml can fix: they are ParamsErrors (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, BertConfig

from kd.core.cli import first_line
from kd.core.params import Params, ParamsError
from kd.data.assets import load_tokenizer, resolve_model
from kd.data.weights import require_intact
from kd.distill.distiller import check_compatible

# The files a saved model's weights live in (a sharded save has an index beside its shards).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HINT = (
    "give a folder made with save_pretrained, a hub name such as 'bert-base-uncased' (with the "
    "network), or 'default' for the packaged teacher"
)


def config(source: str, key: str):
    """The config of the model ``key`` names; one paragraph if there is none to read."""
    where = resolve_model(source, key)
    try:
        return AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:  # transformers' "not a folder, not on the hub"
        raise SystemExit(
            f"{key}: cannot read a model config from '{source}' ({first_line(err)}): {HINT}"
        ) from None


def tokenizer(source: str, key: str):
    try:
        return load_tokenizer(source)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(
            f"{key}: cannot load a tokenizer from '{source}' ({first_line(err)}): {HINT}"
        ) from None


def require_weights(source: str, key: str) -> None:
    """A local model folder must hold its weights, whole (a hub name is checked when it is
    fetched): a file's header and size tell, without reading the weights."""
    folder = Path(resolve_model(source))
    if folder.is_dir() and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise SystemExit(
            f"{key}: the folder '{source}' holds no model weights (none of "
            f"{', '.join(WEIGHT_FILES)}): point it at a folder saved with save_pretrained"
        )
    require_intact(folder, key)


def require_vocabulary(tok, cfg, key: str, source: str) -> None:
    # Token ids index the model's embedding rows: more ids than rows crash inside the model, and
    # far fewer mean the tokenizer is not the model's (a folder without its vocabulary files
    # gets a handful of special tokens, and every word becomes [UNK]).
    if len(tok) != cfg.vocab_size:
        raise SystemExit(
            f"{key}: the tokenizer of '{source}' has {len(tok)} tokens but the model's config "
            f"has a vocabulary of {cfg.vocab_size}: the folder lacks the model's own tokenizer "
            "files (vocab.txt or tokenizer.json); save the tokenizer beside the model, or name "
            "one with tokenize.teacher_tokenizer"
        )


def positions(cfg) -> int | None:
    return getattr(cfg, "max_position_embeddings", None)


def require_positions(length: int, length_key: str, cfg, model: str) -> None:
    require_fits(length, length_key, positions(cfg), model)


def require_fits(length: int, length_key: str, n: int | None, model: str) -> None:
    """``length`` tokens fit ``model``'s ``n`` positions (None: no limit); else a params error."""
    if n is not None and length > n:
        raise ParamsError(
            f"{length_key}={length} is longer than the {n} positions of {model} "
            f"(max_position_embeddings in its config): set {length_key} to at most {n}"
        )


def student_config(p: Params, vocab_size: int):
    """The student's config: its checkpoint's, or the one kd/models/student.py will build."""
    if p.student.checkpoint:
        return config(p.student.checkpoint, "student.checkpoint")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=p.student.hidden_size,
        num_hidden_layers=p.student.num_hidden_layers,
        num_attention_heads=p.student.num_attention_heads,
        intermediate_size=p.student.intermediate_size,
        max_position_embeddings=max(512, p.tokenize.max_seq_length),
    )


def check(p: Params) -> None:
    teacher = config(p.teacher.source, "teacher.source")
    require_weights(p.teacher.source, "teacher.source")
    tok_source, tok_key = (
        (p.tokenize.teacher_tokenizer, "tokenize.teacher_tokenizer")
        if p.tokenize.teacher_tokenizer else (p.teacher.source, "teacher.source")
    )
    tok = tokenizer(tok_source, tok_key)
    require_vocabulary(tok, teacher, tok_key, tok_source)

    student = student_config(p, len(tok))
    if p.student.checkpoint:
        require_weights(p.student.checkpoint, "student.checkpoint")
        if student.vocab_size != len(tok):
            raise SystemExit(
                f"student.checkpoint: '{p.student.checkpoint}' has a vocabulary of "
                f"{student.vocab_size} word pieces but the teacher's has {len(tok)}: logit "
                "distillation needs one vocabulary; pick a student built on the teacher's "
                "vocabulary, or set student.checkpoint: null to build one from the config"
            )
    # The student's own tokenizer, where it has one (kd.data.assets.tokenizers picks the same).
    for source, key in ((p.tokenize.student_tokenizer, "tokenize.student_tokenizer"),
                        (p.student.checkpoint, "student.checkpoint")):
        if source:
            require_vocabulary(tokenizer(source, key), student, key, source)
            break

    for cfg, model in ((teacher, "the teacher"), (student, "the student")):
        require_positions(p.tokenize.max_seq_length, "tokenize.max_seq_length", cfg, model)
        require_positions(p.probe.max_seq_length, "probe.max_seq_length", cfg, model)
    for arm in p.loss.arms:
        try:
            check_compatible(student, teacher, p.loss.schemes[arm])
        except SystemExit as err:  # a layer map or head count only params.yaml can fix
            raise ParamsError(f"loss.schemes.{arm}: {err}") from None
