"""The chunked-loss benchmark (python -m kd.bench.chunked_loss) compares like with like, and the
memory curve the README reports from it (−71 % at 1,024 positions, −92 % at 4,096: the chunked
loss's added peak stays flat while the unchunked one grows with the positions) holds."""

from __future__ import annotations

import json

import pytest

from kd.bench import chunked_loss


@pytest.mark.slow
def test_the_chunked_loss_adds_a_flat_fraction_of_the_unchunked_peak(tmp_path) -> None:
    # SmolLM2's widths at 1k+ positions take minutes here; the same O(N·V) against O(chunk·V)
    # comparison at vocabulary 4,096 and hidden 64 takes seconds: four fresh processes.
    out = tmp_path / "chunked.json"
    args = ["--tokens", "512", "1024", "--chunk", "32", "--hidden", "64", "--vocab", "4096"]
    assert chunked_loss.main([*args, "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert (result["vocab"], result["hidden"], result["chunk"]) == (4096, 64, 32)
    rows = {(r["way"], r["tokens"]): r for r in result["rows"]}
    assert set(rows) == {(w, n) for w in ("unchunked", "chunked") for n in (512, 1024)}
    for n in (512, 1024):
        u, c = rows[("unchunked", n)], rows[("chunked", n)]
        # The same inputs (one seed) and the same loss, computed two ways.
        assert c["loss"] == pytest.approx(u["loss"], rel=1e-5)
        # The README's smallest saving is −71 %; at these widths the logits weigh even more.
        assert c["peak_mib"] < 0.29 * u["peak_mib"], (n, c, u)
        assert result["table"][2 + (n == 1024)].startswith(f"| {n} |")
    u_growth = rows[("unchunked", 1024)]["peak_mib"] - rows[("unchunked", 512)]["peak_mib"]
    c_growth = rows[("chunked", 1024)]["peak_mib"] - rows[("chunked", 512)]["peak_mib"]
    # Unchunked: several [N, V] tensors, so 512 more positions add ~200 MiB. Chunked: nothing
    # grows with N but [N, H] gradients; one [N, V] float32 tensor kept alive would add 8 MiB
    # (~4 % of the unchunked growth), so the bound is 2 %.
    assert u_growth > 100, rows
    assert c_growth < 0.02 * u_growth, rows


def test_the_default_shapes_are_smollm2s() -> None:
    assert (chunked_loss.HIDDEN, chunked_loss.VOCAB) == (576, 49_152)
