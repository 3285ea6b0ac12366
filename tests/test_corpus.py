from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from kd.core.params import Corpus
from kd.data import corpus
from kd.data.corpus import Document


def _cfg(path: Path, **kw) -> Corpus:
    return Corpus(source="text", text_path=path, **kw)


def _ids(docs: list[Document]) -> list[str]:
    return [d.id for d in docs]


# --- normalisation -------------------------------------------------------------------------------


def test_normalise_collapses_whitespace_and_strips() -> None:
    assert corpus.normalise("  a\tb\n\nc   d \r\n") == "a b c d"


def test_normalise_applies_nfc() -> None:
    decomposed = "Cafe\u0301"  # 'e' + combining acute accent
    out = corpus.normalise(decomposed)
    assert out == "Caf\u00e9"
    assert unicodedata.is_normalized("NFC", out)


def test_clean_drops_short_documents_after_normalisation() -> None:
    docs = [Document("a", "   tiny   \n\n  "), Document("b", "x" * 10), Document("c", "y" * 9)]
    # 'tiny' is 4 characters once its whitespace is gone.
    assert _ids(corpus.clean(docs, min_chars=5)) == ["b", "c"]
    assert _ids(corpus.clean(docs, min_chars=10)) == ["b"]


def test_clean_drops_duplicates_keeping_the_first() -> None:
    docs = [
        Document("first", "The same text here."),
        Document("other", "Different text."),
        Document("second", "The  same\ntext here."),  # equal after normalisation
        Document("third", "\tThe same text here. "),
    ]
    kept = list(corpus.clean(docs, min_chars=0))
    assert _ids(kept) == ["first", "other"]
    assert kept[0].text == "The same text here."


def test_clean_counts_nfc_variants_as_duplicates() -> None:
    docs = [Document("nfc", "caf\u00e9 au lait"), Document("nfd", "cafe\u0301 au lait")]
    assert _ids(corpus.clean(docs, min_chars=0)) == ["nfc"]


# --- sampling ------------------------------------------------------------------------------------


def test_same_params_and_seed_give_byte_identical_splits(tiny_text_corpus, tmp_path) -> None:
    cfg = _cfg(tiny_text_corpus, n_docs=20, test_fraction=0.2)
    outs = []
    for run in ("one", "two"):
        folder = tmp_path / run
        folder.mkdir()
        for name, docs in corpus.sample(cfg, seed=7).items():
            corpus.write_split(folder / f"{name}.jsonl", docs)
        outs.append({f.name: f.read_bytes() for f in sorted(folder.iterdir())})
    assert outs[0].keys() == {"train.jsonl", "test.jsonl"}
    assert outs[0] == outs[1]


def test_different_seed_gives_different_sample(tiny_text_corpus) -> None:
    cfg = _cfg(tiny_text_corpus, n_docs=10, test_fraction=0.2)
    a, b = corpus.sample(cfg, seed=0), corpus.sample(cfg, seed=1)
    assert _ids(a["train"] + a["test"]) != _ids(b["train"] + b["test"])
    assert set(_ids(a["train"] + a["test"])) != set(_ids(b["train"] + b["test"]))


def test_split_is_by_document_and_covers_the_sample(tiny_text_corpus) -> None:
    cfg = _cfg(tiny_text_corpus, n_docs=20, test_fraction=0.25)
    splits = corpus.sample(cfg, seed=3)
    train, test = set(_ids(splits["train"])), set(_ids(splits["test"]))
    assert not train & test
    assert len(train) + len(test) == 20
    assert len(test) == 5
    every = {d.id: d.text for d in corpus.clean(corpus.read_documents(cfg), cfg.min_chars)}
    assert train | test <= set(every)
    # Texts are the normalised source texts, untouched by the split.
    for d in splits["train"] + splits["test"]:
        assert d.text == every[d.id]
    assert not {d.text for d in splits["train"]} & {d.text for d in splits["test"]}


def test_all_documents_when_unsized(tiny_text_corpus) -> None:
    splits = corpus.sample(_cfg(tiny_text_corpus, test_fraction=0.1), seed=0)
    assert len(splits["train"]) + len(splits["test"]) == 30
    assert len(splits["test"]) == 3


def test_n_words_sizing_stops_at_the_first_document_reaching_it(tiny_text_corpus) -> None:
    n_words = 150
    splits = corpus.sample(_cfg(tiny_text_corpus, n_words=n_words, test_fraction=0.2), seed=5)
    # The sample is test + train in permutation order: the total reaches n_words, and it did not
    # before the last document was added.
    picked = splits["test"] + splits["train"]
    words = [len(d.text.split()) for d in picked]
    assert sum(words) >= n_words
    assert sum(words) - words[-1] < n_words
    assert corpus.stats(splits)["train"]["words"] + corpus.stats(splits)["test"]["words"] == sum(
        words
    )


def test_n_words_more_than_the_corpus(tiny_text_corpus) -> None:
    with pytest.raises(SystemExit, match=r"corpus.n_words=1000000 is more than"):
        corpus.sample(_cfg(tiny_text_corpus, n_words=1_000_000), seed=0)


def test_n_docs_more_than_the_corpus(tiny_text_corpus) -> None:
    with pytest.raises(SystemExit) as info:
        corpus.sample(_cfg(tiny_text_corpus, n_docs=100), seed=0)
    msg = str(info.value)
    assert "corpus.n_docs=100" in msg
    assert "30 usable documents" in msg
    assert "at most 30" in msg


def test_too_few_documents_for_a_test_split(tmp_path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("A single document that is comfortably long enough.\n")
    with pytest.raises(SystemExit, match="too few to hold out a test split"):
        corpus.sample(_cfg(f), seed=0)


def test_empty_corpus(tmp_path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("\n\n   \n\nshort\n")
    with pytest.raises(SystemExit) as info:
        corpus.sample(_cfg(f), seed=0)
    assert "no documents" in str(info.value)
    assert "corpus.min_chars" in str(info.value)


def test_folder_without_text_files(tmp_path) -> None:
    (tmp_path / "notes.md").write_text("# not a corpus file\n")
    with pytest.raises(SystemExit, match="holds no readable documents"):
        corpus.sample(_cfg(tmp_path), seed=0)


def test_stats_and_split_round_trip(tiny_docs, tmp_path) -> None:
    path = tmp_path / "split.jsonl"
    corpus.write_split(path, tiny_docs)
    assert corpus.read_split(path) == tiny_docs
    s = corpus.stats({"train": tiny_docs})["train"]
    assert s["docs"] == len(tiny_docs)
    assert s["words"] == sum(len(d.text.split()) for d in tiny_docs)
    assert s["chars"] == sum(len(d.text) for d in tiny_docs)


def test_write_split_keeps_non_ascii(tmp_path) -> None:
    path = tmp_path / "split.jsonl"
    corpus.write_split(path, [Document("é", "naïve café")])
    assert "naïve café" in path.read_text(encoding="utf-8")
    assert corpus.read_split(path) == [Document("é", "naïve café")]


# --- text sources --------------------------------------------------------------------------------


def _read(path: Path, **kw) -> list[Document]:
    return list(corpus.read_documents(_cfg(path, **kw)))


def test_txt_blank_line_separated(tmp_path) -> None:
    f = tmp_path / "docs.txt"
    f.write_text("First doc,\nstill first.\n\nSecond doc.\n\n\nThird doc.\n")
    docs = list(corpus.clean(_read(f), min_chars=0))
    assert [d.text for d in docs] == ["First doc, still first.", "Second doc.", "Third doc."]
    assert docs[0].id == "docs.txt:0"


def test_jsonl_with_text_column(tmp_path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "one", "x": 1}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert [d.text for d in _read(f, text_column="body")] == ["one", "two"]


def test_jsonl_missing_column(tmp_path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "one"}) + "\n")
    with pytest.raises(SystemExit, match="no field 'text'.*corpus.text_column"):
        _read(f)


def test_jsonl_bad_line_names_the_line(tmp_path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match="line 2"):
        _read(f)


def test_parquet(tmp_path) -> None:
    f = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["alpha", "beta"], "other": [1, 2]}).to_parquet(f)
    docs = _read(f)
    assert [d.text for d in docs] == ["alpha", "beta"]
    assert docs[1].id == "docs.parquet:1"


def test_parquet_missing_column(tmp_path) -> None:
    f = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["alpha"]}).to_parquet(f)
    with pytest.raises(SystemExit, match="no column 'text'"):
        _read(f)


def test_folder_reads_every_kind_in_name_order(tiny_text_corpus) -> None:
    docs = _read(tiny_text_corpus)
    sources = [d.id.split(":")[0] for d in docs]
    assert sources == sorted(sources)
    assert set(sources) == {"a.txt", "b.jsonl", "c.parquet"}
    assert len(list(corpus.clean(docs, 32))) == 30


def test_missing_text_path(tmp_path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(SystemExit) as info:
        _read(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_non_utf8_names_the_file_and_the_fix(tmp_path, name) -> None:
    f = tmp_path / name
    f.write_bytes('{"text": "café au lait, a long enough line"}\n'.encode("latin-1"))
    with pytest.raises(SystemExit) as info:
        _read(f)
    msg = str(info.value)
    assert str(f) in msg
    assert "UTF-8" in msg
    assert "iconv" in msg and "re-encode" in msg


# --- the offline default -------------------------------------------------------------------------


def test_wiki_offline_reads_real_documents() -> None:
    cfg = Corpus(source="wiki_offline")
    docs = list(corpus.read_documents(cfg))
    assert len(docs) > 10_000 - 100
    assert len({d.id for d in docs}) == len(docs)
    cleaned = list(corpus.clean(docs, cfg.min_chars))
    assert len(cleaned) > 0.9 * len(docs)
    words = sum(len(d.text.split()) for d in cleaned)
    assert words > 500_000  # ~0.7M words of English prose
    assert any(" the " in d.text for d in cleaned[:10])


def test_wiki_offline_sample_is_seeded() -> None:
    cfg = Corpus(source="wiki_offline", n_docs=50)
    a, b = corpus.sample(cfg, seed=0), corpus.sample(cfg, seed=0)
    assert a == b
    assert len(a["test"]) == 3 and len(a["train"]) == 47
