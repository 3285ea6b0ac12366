"""Device, precision, threads and the one seed: decided once per stage, from params."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from importlib import metadata

import numpy as np
import torch

from kd.core.params import Base


def set_seed(seed: int) -> torch.Generator:
    """Seed every global RNG and return an explicit generator for data order and masking."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(base: Base) -> torch.device:
    if base.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "base.device is 'cuda' but this machine has no CUDA device that torch can see "
            f"(torch {torch.__version__}): set base.device: auto (or cpu), or run on a GPU machine"
        )
    if base.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(base.device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # oneDNN emulates bf16 on any x86 CPU, but only AVX512-BF16 or AMX make it faster than fp32.
    flags = _cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision :func:`autocast` really uses: bf16 only where asked for and supported."""
    return "bf16" if precision == "bf16" and bf16_supported(device) else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for and supported; a no-op context otherwise."""
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# The libraries whose versions change a stage's numbers (and so the hashes DVC compares).
VERSIONED = ("torch", "transformers", "tokenizers", "datasets", "numpy")


def record(
    device: torch.device | None = None, precision: str | None = None, attention: str | None = None
) -> dict[str, object]:
    """What decided a stage's numbers besides its inputs and params, for its outputs and MLflow.

    The device (a GPU by its name: another model computes other sums), the precision
    :func:`autocast` really used (bf16 falls back to fp32 on a CPU without AVX512-BF16/AMX),
    the attention kernel of a model being trained, torch's thread count (it sets the order of
    float sums) and the versions of :data:`VERSIONED`. The same on the same kind of machine,
    so it can sit in an output DVC hashes; wall-clock times and host names never do.
    """
    out: dict[str, object] = {}
    if device is not None:
        out["device"] = device.type
        if device.type == "cuda":
            out["device"] = f"cuda:{torch.cuda.get_device_name(device)}"
        if precision is not None:
            out["precision"] = effective_precision(device, precision)
    if attention is not None:
        out["attention"] = attention
    out["threads"] = torch.get_num_threads()
    for package in VERSIONED:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def attention_implementation(choice: str, device: torch.device) -> str:
    """The attention kernel for a model that is *trained* on ``device`` (``base.attention``).

    ``auto`` picks eager attention on the CPU and SDPA elsewhere. torch's fused CPU kernel
    (flash attention for CPU) has a forward as fast as eager's but a backward several times
    slower: on the default teacher (6 × 12 heads, batch 16 × 128, bf16, 2 cores) its backward
    took ~22 % of the whole training step, and eager made that step 1.39× faster and a
    distillation step 1.17–1.20× (README, Performance). On CUDA the fused kernels win, so SDPA stays. Models that only run forward
    keep whatever they loaded with.
    """
    if choice != "auto":
        return choice
    return "eager" if device.type == "cpu" else "sdpa"


def use_training_attention(model: torch.nn.Module, choice: str, device: torch.device) -> None:
    """Switch ``model`` (a transformers model) to :func:`attention_implementation`'s kernel.

    Only the kernel changes, not the weights or the math (softmax(QKᵀ/√d + mask)·V); the
    choice is not saved with the model.
    """
    impl = attention_implementation(choice, device)
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit hosts


def keep_freed_memory() -> bool:
    """Let freed heap memory stay in the process (glibc only); returns whether it applied.

    A training step allocates and frees the same large temporaries every time (attention maps,
    ~300 × 30k logits, dropout masks). By default glibc serves each block above a moving
    threshold with a fresh ``mmap`` and unmaps it on free, and trims the heap's top as soon as
    128 KiB are free, so every step faults its temporaries back in page by page: ~4 s of kernel
    time in a 20-step run. Serving blocks up to 32 MiB from the heap and keeping the heap made
    the multi arm's step in the training loop 782 → 695 ms (README, Performance); the numbers
    are untouched. The process keeps its peak heap until it exits instead of returning it
    between steps. Other C libraries (macOS, musl) have no ``mallopt``: nothing changes there.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),  # a fixed threshold also stops it moving
            (_M_TRIM_THRESHOLD, 2**31 - 1),
            (_M_TOP_PAD, 512 << 20),  # grow the heap in large steps (address space, not RSS)
        )
    )


def configure(threads: int = 0) -> None:
    """Process-wide settings for a stage: torch's intra-op threads (0 keeps torch's default,
    one per core), the allocator (:func:`keep_freed_memory`), and no tokenizers fork warnings."""
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
    # Tokenizers fork-parallelism warns (and can deadlock) once torch has started threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def setup_unseeded(base: Base) -> torch.device:
    """For a stage whose numbers draw nothing random (a teacher's forward, greedy decoding, a
    probe seeded by ``probe.seed``): :func:`configure` and the device, no seed read, so that
    dvc.yaml need not list ``base.seed`` and another seed reuses the stage's output."""
    configure(base.threads)
    return pick_device(base)


def setup(base: Base, seed: int | None = None) -> tuple[torch.device, torch.Generator]:
    """For a stage that computes on a device: :func:`configure` with ``base.threads``, the seed
    (``base.seed`` unless the stage has its own); returns the device and an explicit generator."""
    return setup_unseeded(base), set_seed(base.seed if seed is None else seed)
