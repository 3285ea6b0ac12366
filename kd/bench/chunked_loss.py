"""Peak memory and time of the chunked next-token loss against the unchunked one.

``python -m kd.bench.chunked_loss`` times one forward + backward of a divergence between a
teacher's and a student's next-token distributions at N = 1k…8k positions, on SmolLM2-135M's
shapes (hidden 576, vocabulary 49,152; the student is a layer subset of the teacher, so the same
widths), two ways:

- ``unchunked``: the student's logits for all N positions from its last hidden states and head,
  the teacher's likewise (no gradient), then ``kd.causal.divergences.next_token_loss``: what a
  plain implementation does;
- ``chunked``: ``kd.causal.chunked.chunked_next_token_loss`` with the teacher as a
  ``TeacherHead``, ``--chunk`` positions at a time.

Each (way, N) runs in a fresh process so one row's freed memory cannot hide the next one's peak.
Peak memory is what the loss adds above its inputs: on a GPU ``torch.cuda.max_memory_allocated``
after a reset; on the CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) minus its resident set before the loss. Rows and ratios go to ``--out``
(JSON) and a Markdown table on stdout; times are wall seconds of one step after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, VOCAB = 576, 49_152  # SmolLM2-135M


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def _one(
    way: str,
    n: int,
    divergence: str,
    chunk: int,
    device: str,
    limit_gib: float,
    hidden_size: int = HIDDEN,
    vocab: int = VOCAB,
) -> dict:
    """One forward + backward of one way at n positions, in this process."""
    import resource

    # A row that does not fit fails with an allocation error instead of waking the OOM killer
    # (which may pick another process): RLIMIT_DATA bounds malloc and anonymous mmap alike.
    limit = int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch

    from kd.bench.bench import PeakRSS
    from kd.causal import divergences as D
    from kd.causal.chunked import TeacherHead, chunked_next_token_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    hidden = torch.randn(n, hidden_size, device=dev)
    weight = (torch.randn(vocab, hidden_size, device=dev) / hidden_size**0.5).requires_grad_(True)
    teacher = TeacherHead(
        torch.randn(n, hidden_size, device=dev),
        torch.randn(vocab, hidden_size, device=dev) / hidden_size**0.5,
    )
    div = D.divergence(divergence)

    def step() -> float:
        h = hidden.clone().requires_grad_(True)
        weight.grad = None
        if way == "chunked":
            loss = chunked_next_token_loss(h, weight, teacher, div, chunk_size=chunk)
        else:
            logits = torch.nn.functional.linear(h, weight)
            loss = D.next_token_loss(logits, teacher[slice(None)], div)
        loss.backward()
        return float(loss)

    step()  # warm-up: allocator pools and kernels are set up before the measured step
    weight.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        value = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as mem:  # VmHWM reset to VmRSS on entry, read on exit
            start = time.perf_counter()
            value = step()
            seconds = time.perf_counter() - start
        peak_mib = mem.added_mib
    return {"way": way, "tokens": n, "seconds": seconds, "peak_mib": peak_mib, "loss": value}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kd.bench.chunked_loss", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--divergence", default="jsd", help="a name in kd.causal.divergences (jsd)")
    ap.add_argument("--chunk", type=int, default=256, help="positions per block (256)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    # Smaller widths keep the same O(N·V) against O(chunk·V) comparison quick (the test's).
    ap.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden size ({HIDDEN})")
    ap.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary ({VOCAB})")
    ap.add_argument("--out", default="data/bench/chunked_loss.json")
    ap.add_argument(
        "--limit-gib",
        type=float,
        default=round(0.8 * _available_gib(), 1),
        help="memory a row may use on the CPU (default: 80 %% of what is available)",
    )
    ap.add_argument("--one", nargs=2, metavar=("WAY", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # a child process: one row, as JSON on stdout
        print(
            json.dumps(
                _one(
                    args.one[0],
                    int(args.one[1]),
                    args.divergence,
                    args.chunk,
                    args.device,
                    args.limit_gib,
                    args.hidden,
                    args.vocab,
                )
            )
        )
        return 0

    rows = []
    for n in args.tokens:
        for way in ("unchunked", "chunked"):
            cmd = [sys.executable, "-m", "kd.bench.chunked_loss", "--one", way, str(n),
                   "--divergence", args.divergence, "--chunk", str(args.chunk), "--device", args.device,
                   "--limit-gib", str(args.limit_gib), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                last = (out.stderr.strip().splitlines() or ["killed"])[-1]
                oom = "can't allocate memory" in last or "out of memory" in last.lower()
                error = f"out of memory (> {args.limit_gib} GiB)" if oom else last
                rows.append({"way": way, "tokens": n, "error": error})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    by = {(r["way"], r["tokens"]): r for r in rows}
    table = ["| tokens | unchunked MiB | chunked MiB | memory | unchunked s | chunked s | time |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for n in args.tokens:
        u, c = by[("unchunked", n)], by[("chunked", n)]
        if "error" in u or "error" in c:

            def cell(r, key, fmt):
                return r.get("error") or format(r[key], fmt)

            table.append(
                f"| {n} | {cell(u, 'peak_mib', '.0f')} | {cell(c, 'peak_mib', '.0f')} | | "
                f"{cell(u, 'seconds', '.2f')} | {cell(c, 'seconds', '.2f')} | |"
            )
            continue
        table.append(
            f"| {n} | {u['peak_mib']:.0f} | {c['peak_mib']:.0f} | "
            f"{100 * (c['peak_mib'] / u['peak_mib'] - 1):+.0f} % | {u['seconds']:.2f} | "
            f"{c['seconds']:.2f} | {c['seconds'] / u['seconds']:.2f}× |"
        )
    import torch

    result = {
        "divergence": args.divergence, "chunk": args.chunk, "device": args.device,
        "hidden": args.hidden, "vocab": args.vocab, "limit_gib": args.limit_gib, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rows": rows, "table": table,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
