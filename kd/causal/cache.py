"""The teacher run once: its top-k next-token log-probabilities at every position, in shards.

Every arm, seed and scheme that needs only the teacher's logits reads them from here instead of
running the teacher at every step (and holding it in memory). Per sequence of L tokens the cache
stores, for each of the L − 1 positions that predict a next token:

- ``ids`` [L − 1, k] the teacher's k most likely next tokens, in the smallest unsigned integer
  type that holds the vocabulary (uint16 for SmolLM2's 49,152 words);
- ``logprobs`` [L − 1, k] their log-probabilities under the teacher's full softmax at the cache's
  temperature, in float16 (compact; read back renormalised) or float32 (exact);
- ``rest`` [L − 1] log(1 − Σ_k p), the remaining mass, so the k + 1 bins are a proper
  distribution (absent when k is the whole vocabulary), in the log-probabilities' type.

At k = 64 that is 258 bytes per position in float16 (516 in float32 with int32 ids, the old
store); float16's 11-bit significand keeps the KL between the float32 and the compact store at
~1e-6 nats per position (tests/test_causal_cache.py bounds it at 1e-3).

**Shards.** The rows are cut into shards of ``shard_blocks`` rows (the last may be shorter), each a
folder of three ``.npy`` files, memory-mapped when read. A shard is computed in batches from its
first row, written to a temporary folder, self-checked, then renamed to its final name: a rename
is atomic, so a killed run leaves finished shards and at most one temporary folder, never a
half-written shard under a finished name. Unfinished work lives in a side folder (``work``: the
stage's is ``paths.checkpoints/causal-cache``, outside the DVC out, which DVC deletes before the
stage runs); a rerun with the same inputs resumes after the finished shards, and when every shard
is done they are moved into ``out`` with ``cache.json``. A shard's bytes depend only on its rows
and the inputs (never on which run or rank computed it), so a resumed cache is byte-identical to
one written in one go. Under torchrun the shards are dealt round-robin to the ranks (the same
shards, in the same batches: the same bytes as one process on the same device and threads).

**Identity.** ``cache.json`` records what the cache was computed from (:func:`identity`: the
teacher's and the tokens' digests, k, temperature, precision, storage type); training opens it
with the identity its own inputs imply and refuses a cache that differs (:class:`Cache`).

**Alignment self-check.** For one row of every shard, read back from the written files, the
stored top-1 token must be the teacher's argmax of the model's own forward on the same token row
(within rounding): a cache shifted by one position (the off-by-one other toolkits shipped) fails
at nearly every position.

The teacher's blocks run in the pipeline's precision (bf16 autocast where the device makes it
faster, as the online teacher runs in training) and its LM head in float32, so the stored
log-probabilities are not rounded to bf16's 8 bits: measured on the default teacher over 16
held-out blocks, 1.9× faster than float32 throughout, KL(float32 ‖ this) = 2.8e-4 nats per
position (bf16 logits too: 2.3×, 6.5e-4).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd.causal.divergences import TopK, top_k
from kd.core import dist as kdist
from kd.core.dist import SINGLE, Dist
from kd.core.io import atomic_dir, file_digest, read_json, write_json
from kd.core.runtime import autocast, effective_precision

META = "cache.json"  # identity, layout and shards: what the cache was made with
FORMAT = 2  # 1: one Arrow dataset, int32 ids and float32 log-probs, no identity
PROGRESS = "progress.json"  # the side folder's fingerprint: whose shards these are
SHARDS = "shards"
DTYPES = {"float16": np.float16, "float32": np.float32}
# How far below the recomputed best the stored top-1 may score before the self-check fires:
# rounding between two forwards of the same row (bf16 blocks and head under autocast), far
# below what a shifted row gives.
ALIGN_TOL = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}


def id_dtype(vocab: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id of a ``vocab``-word model."""
    for t in (np.uint8, np.uint16, np.uint32):
        if vocab - 1 <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.uint64)


def bytes_per_position(k: int, vocab: int, dtype: str) -> int:
    """The cache's bytes per predicting position: k ids, k log-probabilities, the rest bin."""
    value = np.dtype(DTYPES[dtype]).itemsize
    return k * (id_dtype(vocab).itemsize + value) + (value if k < vocab else 0)


def identity(teacher: str, tokens: str, k: int, temperature: float, precision: str,
             dtype: str) -> dict:  # fmt: skip
    """What a cache is computed from: the teacher's and the tokens' digests
    (kd.core.io.dir_digest of the teacher folder and of the tokens' train split), k, the
    temperature, the requested ``base.precision`` and the log-probabilities' storage type."""
    return {"teacher": teacher, "tokens": tokens, "k": k, "temperature": float(temperature),
            "precision": precision, "dtype": dtype}  # fmt: skip


def shard_ranges(rows: int, shard_blocks: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_blocks, rows)) for s in range(0, rows, shard_blocks)]


def _name(start: int, end: int) -> str:
    return f"{start:010d}-{end:010d}"


def _predicting(hidden: Tensor) -> Tensor:
    """The hidden states of the positions that predict a next token (all but the last)."""
    return hidden[:, :-1]


@torch.no_grad()
def _support(teacher, ids: Tensor, mask: Tensor, k: int, temperature: float, precision: str,
             device: torch.device) -> TopK:  # fmt: skip
    """The top-k support at a batch's B · (L − 1) predicting positions."""
    with autocast(device, precision):
        hidden = teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    # The float32 head: logits not rounded to bf16.
    logits = teacher.get_output_embeddings()(_predicting(hidden).float())
    return top_k(logits.flatten(0, 1), k, temperature)


def _save_shard(folder: Path, ids, logprobs, rest, vocab: int, dtype: str) -> None:
    folder.mkdir()
    columns = {"ids": ids.astype(id_dtype(vocab)), "logprobs": logprobs.astype(DTYPES[dtype])}
    if rest is not None:
        columns["rest"] = rest.astype(DTYPES[dtype])
    for name, array in columns.items():
        with open(folder / f"{name}.npy", "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename that marks the shard finished


def _compute_shard(teacher, tokens, start: int, end: int, folder: Path, *, k: int,
                   temperature: float, batch_size: int, precision: str, dtype: str,
                   device: torch.device) -> None:  # fmt: skip
    vocab = teacher.config.vocab_size
    parts: dict[str, list] = {"ids": [], "logprobs": [], "rest": []}
    for b in range(start, end, batch_size):
        batch = tokens[b : min(b + batch_size, end)]
        ids = torch.as_tensor(batch["input_ids"], device=device)
        mask = torch.as_tensor(batch["attention_mask"], device=device)
        s = _support(teacher, ids, mask, k, temperature, precision, device)
        n, positions = ids.shape[0], ids.shape[1] - 1
        parts["ids"].append(s.ids.view(n, positions, k).cpu().numpy())
        parts["logprobs"].append(s.logprobs.float().view(n, positions, k).cpu().numpy())
        if s.rest is not None:
            parts["rest"].append(s.rest.float().view(n, positions).cpu().numpy())
    rest = np.concatenate(parts["rest"]) if parts["rest"] else None
    _save_shard(folder, np.concatenate(parts["ids"]), np.concatenate(parts["logprobs"]), rest,
                vocab, dtype)  # fmt: skip


class AlignmentError(RuntimeError):
    """The stored top-1 is not the teacher's argmax on the same token row: a bug, not a user
    error (rows shifted against the tokens), so it keeps its traceback."""


@torch.no_grad()
def check_alignment(teacher, tokens, row: int, stored_top1: np.ndarray, precision: str,
                    device: torch.device) -> None:  # fmt: skip
    """Fire when the stored top-1 ids of token row ``row`` [L − 1] are not the teacher's argmax
    on that row, computed by the model's own forward (not the cache's code path)."""
    ids = torch.as_tensor(tokens[row : row + 1]["input_ids"], device=device)
    mask = torch.as_tensor(tokens[row : row + 1]["attention_mask"], device=device)
    with autocast(device, precision):
        logits = teacher(input_ids=ids, attention_mask=mask).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1)
    stored = torch.as_tensor(stored_top1.astype(np.int64), device=device)
    gap = lp.max(-1).values - lp.gather(-1, stored[:, None])[:, 0]
    tol = ALIGN_TOL[effective_precision(device, precision)]
    bad = (gap > tol).nonzero()[:, 0].tolist()
    if bad:
        raise AlignmentError(
            f"teacher cache self-check: at token row {row}, the stored top-1 token is not the "
            f"teacher's argmax at {len(bad)} of {len(gap)} positions (first: position {bad[0]}, "
            f"{float(gap[bad[0]]):.3g} nats below the best, tolerance {tol}): the stored rows "
            "are misaligned with the tokens (an off-by-one?)"
        )


def _code_digest() -> str:
    # A shard resumed from the side folder must come from this code: a fix to the cache's code
    # (or the top-k it calls) starts over.
    from kd.causal import divergences

    return hashlib.sha256("".join(file_digest(f) for f in (__file__, divergences.__file__))
                          .encode()).hexdigest()  # fmt: skip


def write(teacher, tokens, out: str | Path, k: int, temperature: float = 1.0, batch_size: int = 8,
          precision: str = "fp32", *, dtype: str = "float32", shard_blocks: int = 128,
          sources: dict | None = None, work: str | Path | None = None,
          dist: Dist = SINGLE) -> dict | None:  # fmt: skip
    """Run ``teacher`` over ``tokens`` (a datasets.Dataset of full blocks: ``input_ids`` and
    ``attention_mask``) and save its top-k support to ``out``; returns the metadata (None on
    ranks other than 0). ``precision`` is ``base.precision``: the blocks' (autocast), not the
    head's; ``dtype`` the log-probabilities' storage (float16 | float32); ``sources`` the
    teacher's and tokens' digests for the identity (``{"teacher": …, "tokens": …}``); ``work``
    the side folder of unfinished shards (default: a hidden sibling of ``out``), resumed when it
    holds shards of the same inputs; ``dist`` the process group whose ranks share the shards."""
    vocab = teacher.config.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"cache k must be in [1, {vocab}] (the teacher's vocabulary), got {k}")
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(f".{out.name}.work")
    device = next(teacher.parameters()).device
    sources = sources or {}
    ident = identity(sources.get("teacher"), sources.get("tokens"), k, temperature, precision,
                     dtype)  # fmt: skip
    rows, length = len(tokens), len(tokens[0]["input_ids"])
    ranges = shard_ranges(rows, shard_blocks)
    fingerprint = {"identity": ident, "rows": rows, "length": length, "batch_size": batch_size,
                   "shard_blocks": shard_blocks, "code": _code_digest()}  # fmt: skip
    shards = work / SHARDS
    if dist.main:
        _prepare(work, fingerprint)
    kdist.barrier(dist)
    for i, (start, end) in enumerate(ranges):
        if i % dist.world != dist.rank or (shards / _name(start, end)).exists():
            continue
        tmp = shards / f".{_name(start, end)}.tmp-{os.getpid()}"  # _prepare drops leftovers
        _compute_shard(teacher, tokens, start, end, tmp, k=k, temperature=temperature,
                       batch_size=batch_size, precision=precision, dtype=dtype,
                       device=device)  # fmt: skip
        row = start + int(torch.randint(end - start, (1,),
                                        generator=torch.Generator().manual_seed(start)))  # fmt: skip
        written = np.load(tmp / "ids.npy", mmap_mode="r")
        check_alignment(teacher, tokens, row, np.asarray(written[row - start, :, 0]), precision,
                        device)  # fmt: skip
        os.replace(tmp, shards / _name(start, end))  # finished: atomically under its name
    kdist.barrier(dist)
    if not dist.main:
        return None
    missing = [_name(s, e) for s, e in ranges if not (shards / _name(s, e)).exists()]
    if missing:  # a bug (every rank computed its shards) or a folder removed under the run
        raise RuntimeError(f"teacher cache: shards {missing} missing in {shards}")
    meta = {
        "format": FORMAT, "identity": ident, "vocab_size": vocab, "rows": rows,
        "positions": length - 1, "rest": k < vocab, "ids_dtype": id_dtype(vocab).name,
        "bytes_per_position": bytes_per_position(k, vocab, dtype),
        "ran_precision": effective_precision(device, precision),
        "shards": [list(r) for r in ranges],
    }  # fmt: skip
    with atomic_dir(out) as tmp:
        shutil.move(shards, tmp / SHARDS)  # a rename within one filesystem: no copy
        write_json(tmp / META, meta)
    shutil.rmtree(work, ignore_errors=True)
    return meta


def _prepare(work: Path, fingerprint: dict) -> None:
    """Keep ``work``'s finished shards when they were made from the same inputs and code, else
    start it afresh; drop the temporary folder a killed shard left."""
    progress = work / PROGRESS
    if progress.exists() and json.loads(progress.read_text()) != fingerprint:
        shutil.rmtree(work)
    (work / SHARDS).mkdir(parents=True, exist_ok=True)
    for tmp in (work / SHARDS).glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if not progress.exists():
        write_json(progress, fingerprint)
    elif done := finished_shards(work):
        print(f"teacher cache: {done} finished shard(s) in {work} kept, the rest computed")


def finished_shards(work: str | Path) -> int:
    """How many shards a side folder holds finished (what a rerun will not recompute)."""
    shards = Path(work) / SHARDS
    return sum(1 for f in shards.iterdir() if not f.name.startswith(".")) if shards.exists() else 0


def batch_support(batch: dict[str, Tensor]) -> TopK | None:
    """The teacher's top-k support at a batch's B · (L − 1) predicting positions, flattened in
    the order of ``logits[:, :-1].flatten(0, 1)``, when the batch carries the cache's rows."""
    if "topk_ids" not in batch:
        return None
    rest = batch.get("topk_rest")
    return TopK(batch["topk_ids"].flatten(0, 1), batch["topk_logprobs"].flatten(0, 1),
                None if rest is None else rest.flatten(0, 1))  # fmt: skip


def _refuse(path: Path, problem: str) -> SystemExit:
    return SystemExit(
        f"the teacher cache in {path} {problem}; training would distil the wrong teacher "
        f"distribution (or rows misaligned with its tokens), so it stops here: rebuild the "
        f"cache from the current teacher, tokens and params with `dvc repro "
        f"causal/dvc.yaml:causal_cache` (or `python -m kd.training.launch stages.causal_cache`), "
        f"then rerun training"
    )


class Cache:
    """A written cache, read a batch of rows at a time (memory-mapped: only the rows read are
    loaded). ``expect`` is the :func:`identity` the reader's inputs imply; a cache computed from
    anything else is refused with one paragraph."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        path = Path(path)
        self.meta = read_json(path / META)
        if self.meta.get("format") != FORMAT:
            raise _refuse(path, f"is in an older format ({self.meta.get('format', 1)}, this code "
                                f"reads {FORMAT}) and records no identity")  # fmt: skip
        got = self.meta["identity"]
        if expect is not None and got != expect:
            diff = ", ".join(f"{key} {got.get(key)!r} where the inputs give {expect[key]!r}"
                             for key in expect if got.get(key) != expect[key])  # fmt: skip
            raise _refuse(path, f"was computed from other inputs ({diff})")
        self.compact = got["dtype"] != "float32"
        self.starts = np.array([s for s, _ in self.meta["shards"]])
        self.shards = []
        for s, e in self.meta["shards"]:
            folder = path / SHARDS / _name(s, e)
            cols = ["ids", "logprobs"] + (["rest"] if self.meta["rest"] else [])
            self.shards.append({c: np.load(folder / f"{c}.npy", mmap_mode="r") for c in cols})

    def __len__(self) -> int:
        return self.meta["rows"]

    def _column(self, name: str, rows: np.ndarray) -> np.ndarray:
        where = np.searchsorted(self.starts, rows, side="right") - 1
        return np.stack([self.shards[s][name][r - self.starts[s]]
                         for s, r in zip(where, rows, strict=True)])  # fmt: skip

    def rows(self, rows: list[int] | slice) -> dict[str, Tensor]:
        """The rows' columns as a batch carries them: ``topk_ids`` (int64) and ``topk_logprobs``
        (float32) [rows, L − 1, k], and ``topk_rest`` [rows, L − 1] unless k is the whole
        vocabulary. A compact store's bins are renormalised to sum to 1 (float16 rounding leaves
        them ~1e-4 off), so ``rest`` stays log(1 − Σ_k p)."""
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        ids = torch.from_numpy(self._column("ids", rows).astype(np.int64))
        lp = torch.from_numpy(self._column("logprobs", rows).astype(np.float32))
        rest = (torch.from_numpy(self._column("rest", rows).astype(np.float32))
                if self.meta["rest"] else None)  # fmt: skip
        if self.compact:
            bins = lp if rest is None else torch.cat([lp, rest[..., None]], -1)
            norm = bins.logsumexp(-1)
            lp = lp - norm[..., None]
            rest = None if rest is None else rest - norm
        out = {"topk_ids": ids, "topk_logprobs": lp}
        if rest is not None:
            out["topk_rest"] = rest
        return out

    def support(self, rows: list[int] | slice) -> TopK:
        """The teacher's support at the rows' positions, flattened to [rows · (L − 1), k] in
        the order of ``logits[:, :-1].flatten(0, 1)``."""
        return batch_support(self.rows(rows))
