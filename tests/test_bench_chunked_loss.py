"""The chunked-loss benchmark (python -m kd.bench.chunked_loss) compares like with like, and the
memory curve docs/performance.md reports from it (−71 % at 1,024 positions, −92 % at 4,096: the chunked
loss's added peak stays flat while the unchunked one grows with the positions) holds."""

from __future__ import annotations

import json

import pytest

from kd.bench import chunked_loss


@pytest.mark.slow
@pytest.mark.long  # memory measured in a subprocess per size: minutes, and the bench it guards
def test_the_chunked_loss_adds_a_flat_fraction_of_the_unchunked_peak(tmp_path) -> None:
    # SmolLM2's widths at 1k+ positions take minutes here; the same O(N·V) against O(chunk·V)
    # comparison at vocabulary 4,096 and hidden 64 takes seconds: four fresh processes.
    out = tmp_path / "chunked.json"
    args = ["--tokens", "512", "2048", "--chunk", "32", "--hidden", "64", "--vocab", "4096"]
    assert chunked_loss.main([*args, "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert (result["vocab"], result["hidden"], result["chunk"]) == (4096, 64, 32)
    rows = {(r["way"], r["tokens"]): r for r in result["rows"]}
    assert set(rows) == {(w, n) for w in ("unchunked", "chunked") for n in (512, 2048)}
    for n in (512, 2048):
        u, c = rows[("unchunked", n)], rows[("chunked", n)]
        # The same inputs (one seed) and the same loss, computed two ways.
        assert c["loss"] == pytest.approx(u["loss"], rel=1e-5)
        # docs/performance.md's smallest saving is −71 %; at these widths the logits weigh even more.
        assert c["peak_mib"] < 0.29 * u["peak_mib"], (n, c, u)
        assert result["table"][2 + (n == 2048)].startswith(f"| {n} |")
    u_growth = rows[("unchunked", 2048)]["peak_mib"] - rows[("unchunked", 512)]["peak_mib"]
    c_growth = rows[("chunked", 2048)]["peak_mib"] - rows[("chunked", 512)]["peak_mib"]
    # Unchunked: several [N, V] tensors, so 1,536 more positions add ~350 MiB. Chunked: nothing
    # grows with N but [N, H] tensors (0.4 MiB each) — and the resident set's page and allocator
    # noise, a few MiB (CI once saw +2.4 MiB over 512 positions). The fault this guards, one
    # [N, V] float32 tensor kept alive, adds 24 MiB here: the bound is half of that.
    one_logits_mib = 1536 * 4096 * 4 / 2**20
    assert u_growth > 4 * one_logits_mib, rows
    assert c_growth < 0.5 * one_logits_mib, rows
