"""Where a Hugging Face transformer keeps its parts: the embeddings, the blocks, the head.

Both families name their layers from these (the gradient-norm groups, the hooks, a layer-subset
student), so an encoder (BERT) and a decoder (Llama, Qwen, GPT-2 …) need no code of their own.
"""

from __future__ import annotations

from torch import nn


def blocks_path(model: nn.Module) -> str:
    """The dotted name of the ``nn.ModuleList`` that holds the model's transformer blocks."""
    n = model.config.num_hidden_layers
    found = [
        name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n
    ]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__}: expected one ModuleList of {n} blocks, found {found or 'none'}"
        )
    return found[0]


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(blocks_path(model))


def embeddings(model: nn.Module) -> nn.Module:
    """The embedding layer: BERT's whole ``embeddings`` (words, positions, token types, norm),
    or a decoder's token embedding (its positions are rotary, with no parameters)."""
    found = getattr(model.base_model, "embeddings", None)
    return found if found is not None else model.get_input_embeddings()


def head(model: nn.Module) -> nn.Module:
    """The prediction head: BERT's ``cls`` (a transform, then the decoder), a RoBERTa-style or
    decoder ``lm_head``, else the output embedding."""
    for name in ("cls", "lm_head"):
        if hasattr(model, name):
            return getattr(model, name)
    return model.get_output_embeddings()
