"""The chunked-loss benchmark (python -m kd.bench.chunked_loss) runs and compares like with like."""

from __future__ import annotations

import json

import pytest

from kd.bench import chunked_loss


@pytest.mark.slow
def test_benchmark_rows_agree_and_say_what_they_measured(tmp_path) -> None:
    out = tmp_path / "chunked.json"
    assert (
        chunked_loss.main(["--tokens", "8", "--chunk", "3", "--out", str(out), "--device", "cpu"])
        == 0
    )
    result = json.loads(out.read_text())
    rows = {r["way"]: r for r in result["rows"]}
    assert set(rows) == {"unchunked", "chunked"}
    # The same inputs (one seed) and the same loss, computed two ways.
    assert rows["chunked"]["loss"] == pytest.approx(rows["unchunked"]["loss"], rel=1e-5)
    for row in rows.values():
        assert row["tokens"] == 8 and row["seconds"] > 0 and row["peak_mib"] >= 0
    assert (result["vocab"], result["hidden"], result["chunk"]) == (49_152, 576, 3)
    assert result["table"][2].startswith("| 8 |")
