"""The teacher: load it, give it a masked-LM head when it has none, and score that head.

The embedded default teacher (all-MiniLM-L6-v2) is a sentence encoder: its checkpoint has no
``cls.predictions.*`` weights, so ``AutoModelForMaskedLM`` builds a fresh, random head whose
decoder is tied to the word embeddings. Logit distillation needs meaningful MLM logits, and a
head fitted on the frozen encoder reaches only ~8% masked top-1 (DESIGN.md), so :func:`adapt`
fine-tunes the whole model (encoder + head) with masked-LM for a fixed number of steps.

A teacher that already has a head (``bert-base-uncased``, a saved ``data/teacher``) is used as is.
``teacher.adapt_steps: 0`` skips adaptation altogether: a headless teacher then keeps its random
head, which is only useful to test the plumbing.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from kd.core import optim, runtime
from kd.core.params import Base, Teacher
from kd.data.assets import resolve_model
from kd.data.masking import IGNORE, mask_tokens
from kd.data.weights import require_intact

LOG_EVERY = 10  # steps between MLflow rows during adaptation


def load_teacher(source: str, key: str = "teacher.source") -> tuple[nn.Module, bool]:
    """Load ``source`` as a masked-LM model; return (model in float32, whether it has an MLM head).

    The head counts as missing when any weight outside the base model (``cls.*`` for BERT) was
    absent from the checkpoint and therefore freshly initialised.
    """
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    # transformers prints a long load report (and calls a headless checkpoint "corrupted"); we
    # report the one fact that matters, the missing head, ourselves.
    verbosity = hf_logging.get_verbosity()
    where = resolve_model(source, key)
    require_intact(where, key)  # a cut weights file: one paragraph, not safetensors' error
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            where, output_loading_info=True, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = f"{model.base_model_prefix}."
    missing = sorted(info["missing_keys"])
    head_missing = [k for k in missing if not k.startswith(prefix)]
    body_missing = [k for k in missing if k.startswith(prefix)]
    if body_missing:
        print(
            f"warning: the teacher '{source}' lacks {len(body_missing)} encoder weight(s) "
            f"(e.g. {body_missing[:3]}), which are randomly initialised: is it the right checkpoint?",
            file=sys.stderr,
        )
    has_head = not head_missing
    if not has_head:
        _tie_decoder(model)
    return model, has_head


def decoder_is_tied(model: nn.Module) -> bool:
    """Whether the MLM decoder shares its weight tensor with the input word embeddings."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _tie_decoder(model: nn.Module) -> None:
    # A new head must predict with the pretrained embeddings (BERT's design): an untied random
    # 30k-word decoder would have to be learnt from scratch in a few hundred steps.
    if decoder_is_tied(model):
        return
    model.config.tie_word_embeddings = True
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if not decoder_is_tied(model):
        raise SystemExit(
            f"cannot tie the new MLM decoder of {type(model).__name__} to its word embeddings: "
            "use a teacher with an MLM head or a BERT-family encoder"
        )


def masked_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM logits at the masked positions only, as ([n_masked, vocab], [n_masked] targets).

    The vocabulary projection at all positions dominates the step (30,522 words × 128 positions,
    ~7x the masked ones), so for BERT-style models (a ``cls`` head) the base model runs alone and
    the head sees only the gathered masked hidden states. Other models fall back to full logits.
    """
    where = labels != IGNORE
    head = getattr(model, "cls", None)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[where], labels[where]
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden[where]), labels[where]


def _columns(ds: Dataset, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    # The split is small (8k × 128 int32 ≈ 4 MB a column): hold it as tensors, index per batch.
    table = ds.with_format("numpy", columns=list(names))[:]
    return {k: torch.from_numpy(table[k].astype("int64")) for k in names}


def _batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index batches from seeded permutations, reshuffled each pass."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def adapt(
    model: nn.Module,
    train_ds: Dataset,
    cfg: Teacher,
    base: Base,
    device: torch.device,
    generator: torch.Generator,
    run,
    *,
    mask_token_id: int,
    mlm_probability: float = 0.15,
) -> dict[str, float]:
    """Masked-LM fine-tuning of the whole model for ``cfg.adapt_steps`` steps, in place.

    Batches of ``cfg.batch_size`` blocks in a seeded shuffled order, fresh 80/10/10 masks per
    batch (both from ``generator``), AdamW with linear warm-up then linear decay to 0, gradient
    clipping at 1.0, bf16 autocast when ``base.precision`` asks for it, cross-entropy in float32.
    Dropout is off (the model stays in eval mode; gradients still flow): at a budget of a few
    hundred steps the prototype adapted better without it.

    Returns {"adapt_steps", "adapt_seconds", "final_loss"} (final_loss: mean of the last logged
    window). ``cfg.adapt_steps == 0`` returns at once and leaves the model untouched.
    """
    from transformers import get_linear_schedule_with_warmup

    steps = cfg.adapt_steps
    if steps == 0:
        return {"adapt_steps": 0, "adapt_seconds": 0.0, "final_loss": math.nan}
    cols = _columns(train_ds, ("input_ids", "attention_mask", "special_tokens_mask"))
    n = cols["input_ids"].shape[0]
    if n < cfg.batch_size:
        raise SystemExit(
            f"the train split has {n} blocks, fewer than teacher.batch_size ({cfg.batch_size}): "
            "lower teacher.batch_size or sample a larger corpus"
        )
    vocab_size = model.config.vocab_size
    model.to(device)
    runtime.use_training_attention(model, base.attention, device)
    model.eval()  # dropout off; see the docstring
    optimizer = optim.adamw(model, cfg.lr, cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(cfg.warmup_steps, steps), steps)

    window_loss = torch.zeros((), device=device)  # summed on device: .item() only when logging
    window, final_loss = 0, math.nan
    start = time.perf_counter()
    bar = tqdm(
        enumerate(_batch_order(n, cfg.batch_size, steps, generator), start=1),
        total=steps,
        desc="adapt teacher",
        file=sys.stdout,
    )
    for step, idx in bar:
        ids, labels = mask_tokens(
            cols["input_ids"][idx],
            cols["special_tokens_mask"][idx],
            mask_token_id,
            vocab_size,
            mlm_probability,
            generator,
        )
        ids, labels = ids.to(device), labels.to(device)
        attention = cols["attention_mask"][idx].to(device)
        with runtime.autocast(device, base.precision):
            logits, targets = masked_logits(model, ids, attention, labels)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

        window_loss += loss.detach()
        window += 1
        if step % LOG_EVERY == 0 or step == steps:
            final_loss = window_loss.item() / window  # a device sync point, once per window
            lr = schedule.get_last_lr()[0]
            run.log_metrics(
                {"adapt.loss": final_loss, "adapt.lr": lr, "adapt.grad_norm": grad_norm.item()},
                step=step,
            )
            bar.set_postfix(loss=f"{final_loss:.3f}", lr=f"{lr:.2e}")
            window_loss.zero_()
            window = 0
    bar.close()
    seconds = time.perf_counter() - start
    return {"adapt_steps": steps, "adapt_seconds": seconds, "final_loss": final_loss}


def evaluate_mlm(
    model: nn.Module,
    test_ds: Dataset,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Masked-LM loss and top-1/top-5 accuracy on the tokenize stage's fixed test masks.

    Scores the first ``max_batches`` batches (all when None) in order; every figure is a
    micro-average over all masked positions, so batches with more masks weigh more.
    Returns {"mlm_loss", "top1", "top5", "masked_positions"}.
    """
    cols = _columns(test_ds, ("mlm_input_ids", "attention_mask", "mlm_labels"))
    n = cols["mlm_input_ids"].shape[0]
    n_batches = -(-n // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0, 0, 0
    with torch.inference_mode():
        for b in range(n_batches):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            ids = cols["mlm_input_ids"][sl].to(device)
            attention = cols["attention_mask"][sl].to(device)
            labels = cols["mlm_labels"][sl].to(device)
            with runtime.autocast(device, precision):
                logits, targets = masked_logits(model, ids, attention, labels)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = best == targets[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=-1).sum())
            count += int(targets.numel())
    model.train(was_training)
    if count == 0:
        raise SystemExit("the test split has no masked positions to score the teacher on")
    return {
        "mlm_loss": loss_sum / count,
        "top1": top1 / count,
        "top5": top5 / count,
        "masked_positions": count,
    }


def save(model: nn.Module, tokenizer, path) -> None:
    """Write the teacher (float32) and its tokenizer, so later stages load it from ``path`` alone."""
    model.to(dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
