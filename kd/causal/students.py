"""A causal-LM student made of a subset of its teacher's layers (DistilBERT's initialisation).

Sanh et al. 2019, "DistilBERT, a distilled version of BERT", initialise the student from the
teacher by keeping one layer in two; the student keeps the teacher's embeddings, final norm and
head, so it starts as a shallower copy of the teacher rather than from noise. Works for any
decoder-only model of transformers whose blocks sit in one ``nn.ModuleList`` of
``config.num_hidden_layers`` entries (Llama, Qwen, Mistral, SmolLM, GPT-2 …).
"""

from __future__ import annotations

import copy

from torch import nn

from kd.models.parts import blocks_path


def uniform_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` of the teacher's layers, spread evenly and keeping its first and last
    (for one layer: the last, which the final norm and head were trained on)."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(
            f"a student of {n_student} layers from a teacher of {n_teacher}: need 1..{n_teacher}"
        )
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def from_teacher_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A new model of the teacher's class with ``len(layers)`` blocks, block j a copy of the
    teacher's block ``layers[j]``, and every other weight (embeddings, final norm, head) copied.

    Raises ValueError for an empty, unordered, repeated or out-of-range layer list.
    """
    n = teacher.config.num_hidden_layers
    if not layers or list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < n:
        raise ValueError(
            f"layers must be increasing teacher layer indices in 0..{n - 1}, got {layers}"
        )
    path = blocks_path(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    # Per-layer settings (sliding vs full attention in Qwen2/Gemma …) follow their layers.
    for key in ("layer_types",):
        if isinstance(getattr(config, key, None), list | tuple):
            setattr(config, key, [getattr(config, key)[i] for i in layers])
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)

    renamed = {}
    position = {old: new for new, old in enumerate(layers)}
    for key, value in teacher.state_dict().items():
        if key.startswith(path + "."):
            index, rest = key[len(path) + 1 :].split(".", 1)
            if int(index) not in position:
                continue
            key = f"{path}.{position[int(index)]}.{rest}"
        renamed[key] = value
    student.load_state_dict(renamed, strict=True)
    return student.eval() if not teacher.training else student.train()


def from_config(teacher: nn.Module, seed: int, **shape) -> nn.Module:
    """A randomly initialised student of the teacher's class and vocabulary with ``shape``
    overriding its config (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size`` …): the multi arm's projections then map its
    width to the teacher's. Unknown config keys are refused, not silently added."""
    import torch

    config = copy.deepcopy(teacher.config)
    unknown = sorted(k for k in shape if not hasattr(config, k))
    if unknown:
        raise ValueError(f"{type(config).__name__} has no field(s) {', '.join(unknown)}")
    for key, value in shape.items():
        setattr(config, key, value)
    if "num_hidden_layers" in shape and isinstance(
        getattr(config, "layer_types", None), list | tuple
    ):
        config.layer_types = config.layer_types[: shape["num_hidden_layers"]]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = type(teacher)(config)
    return student.to(next(teacher.parameters()).dtype)
