"""Offline shards from packaged prose, and the rustbpe-trained / tiktoken-run tokenizer."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import rustbpe

from nanochat.dataset import list_parquet_files, split_files, verify_parquet
from nanochat.offline_corpus import kjv_documents, shakespeare_documents, write_shards
from nanochat.tokenizer import (
    RANKS_FILE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    get_token_bytes,
    get_tokenizer,
)


def read_texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


# ----------------------------------------------------------------------------- shards

def test_shards_have_fineweb_layout_and_real_documents(text_shards: Path) -> None:
    files = list_parquet_files(text_shards)
    assert [f.name for f in files] == [f"shard_{i:05d}.parquet" for i in range(len(files))]
    assert split_files(files, "val") == files[-1:] and split_files(files, "train") == files[:-1]
    per_shard = [read_texts(f) for f in files]
    docs = [t for texts in per_shard for t in texts]
    assert sum(map(len, docs)) > 8_000_000                     # the whole packaged corpus
    assert len(docs) == len(set(docs))                         # every document in exactly one shard
    # documents are scenes and chapters, not lines
    assert min(map(len, docs)) > 150 and statistics.median(map(len, docs)) > 2000
    for texts in per_shard:                                    # shuffled: every shard mixes both sources
        assert any(re.match(r"[\w ]+ \d+\n\n", t) for t in texts)           # a KJV chapter
        assert any(re.match(r"[^\n]+\nACT [IVX]+\nSCENE ", t) for t in texts)  # a Shakespeare scene
        assert sum(map(len, texts)) == pytest.approx(sum(map(len, docs)) / len(files), rel=0.15)
    assert pq.ParquetFile(files[0]).num_row_groups > 1         # streaming by row group gets exercised
    assert verify_parquet(files[-1]) == len(per_shard[-1])


def test_sources_are_clean_prose() -> None:
    scenes = list(shakespeare_documents())
    chapters = list(kjv_documents())
    assert len(scenes) > 700 and len(chapters) == 1189
    hamlet = next(d for d in scenes if d.title == "Hamlet, ACT I, SCENE I")
    assert hamlet.text.startswith("Hamlet\nACT I\nSCENE I. Elsinore.")
    assert "FRANCISCO\nNay, answer me" in hamlet.text and "**" not in hamlet.text
    genesis = next(d for d in chapters if d.title == "Genesis 1")
    assert "In the beginning God created the heaven" in genesis.text
    assert "1:1" not in genesis.text                           # verse numbers stripped


def test_write_shards_is_deterministic_and_validates(tmp_path: Path) -> None:
    a = write_shards(tmp_path / "a", num_shards=3, max_chars=300_000)
    b = write_shards(tmp_path / "b", num_shards=3, max_chars=300_000)
    assert [read_texts(p) for p in a] == [read_texts(p) for p in b]
    assert 300_000 <= sum(len(t) for p in a for t in read_texts(p)) < 360_000
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(ValueError, match="num_shards must be >= 2"):
        write_shards(tmp_path / "c", num_shards=1)


def test_verify_parquet_names_a_corrupt_file(tmp_path: Path, text_shards: Path) -> None:
    good = list_parquet_files(text_shards)[0].read_bytes()
    bad = tmp_path / "shard_00000.parquet"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="shard_00000.parquet: not a valid shard"):
        verify_parquet(bad)
    bad.write_bytes(good[:4] + bytes(200) + good[204:])        # garbled pages, intact footer
    with pytest.raises(ValueError, match="shard_00000.parquet"):
        verify_parquet(bad)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_roundtrip_specials_and_format(tiny_tokenizer: Path, text_shards: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    assert tok.get_vocab_size() == 4096
    bos = tok.get_bos_token_id()
    assert bos == 4096 - len(SPECIAL_TOKENS)                  # first id after the merged tokens
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(bos, 4096))
    val = read_texts(list_parquet_files(text_shards)[-1])[:50]
    samples = val + ["naïve café — 東京 🙂\r\n\ttabs  and  spaces 1234567", ""]
    batch = tok.encode(samples, prepend="<|bos|>")
    for text, ids in zip(samples, batch, strict=True):
        assert ids[0] == bos and bos not in ids[1:]
        assert tok.decode(ids[1:]) == text
        assert ids == tok.encode(text, prepend=bos)
    # special-token text inside a document is ordinary text, never a control token
    ids = tok.encode("a <|bos|> b <|assistant_start|>")
    assert not set(ids) & set(range(bos, 4096))
    assert tok.decode(ids) == "a <|bos|> b <|assistant_start|>"
    meta = json.loads((tiny_tokenizer / "tokenizer.json").read_text())
    assert meta["pattern"] == SPLIT_PATTERN and meta["vocab_size"] == 4096
    assert meta["special_tokens"]["<|bos|>"] == bos


def test_token_bytes_count_utf8_bytes(tiny_tokenizer: Path, text_shards: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    token_bytes = get_token_bytes(tiny_tokenizer)
    assert token_bytes.dtype.is_floating_point is False and token_bytes.shape == (4096,)
    assert token_bytes[tok.get_bos_token_id():].sum() == 0 and token_bytes[:256].eq(1).all()
    texts = read_texts(list_parquet_files(text_shards)[-1])[:20] + ["naïve café — 東京 🙂"]
    for text, ids in zip(texts, tok.encode(texts, prepend="<|bos|>"), strict=True):
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert token_bytes.equal(tok.token_bytes())


def test_compression_on_heldout_prose(tiny_tokenizer: Path, text_shards: Path) -> None:
    tok = get_tokenizer(tiny_tokenizer)
    val = read_texts(list_parquet_files(text_shards)[-1])
    n_bytes = sum(len(t.encode()) for t in val)
    n_tokens = sum(map(len, tok.encode(val)))
    assert n_bytes / n_tokens > 3.0                            # bytes alone would be 1.0


def test_ids_match_rustbpe_and_reload(tmp_path: Path, text_shards: Path) -> None:
    texts = read_texts(list_parquet_files(text_shards)[0])[:100]
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), 1000 - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    tok = Tokenizer.train_from_iterator(iter(texts), 1000)
    probe = read_texts(list_parquet_files(text_shards)[-1])[0]
    assert tok.encode(probe) == trainer.encode(probe)           # tiktoken runs exactly what rustbpe learned
    tok.save(tmp_path / "tok")
    again = Tokenizer.from_directory(tmp_path / "tok")
    assert again.encode(probe) == tok.encode(probe) and again.mergeable_ranks() == tok.mergeable_ranks()


def test_bad_tokenizer_input_is_reported(tmp_path: Path, tiny_tokenizer: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 265"):
        Tokenizer.train_from_iterator(iter(["abc"]), 100)
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        Tokenizer.from_directory(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_tokenizer.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    lines = (broken / RANKS_FILE).read_text().splitlines()
    lines[300] = "not-base64!!"
    (broken / RANKS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer.tiktoken:301: expected '<base64> <rank>'"):
        Tokenizer.from_directory(broken)


# ----------------------------------------------------------------------------- scripts

def test_tok_train_and_tok_eval_scripts(text_shards: Path, tiny_tokenizer: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    from scripts import tok_eval, tok_train

    out = tmp_path / "tok8k"
    tok_train.main(["--max_chars=4000000", "--vocab_size=8192", "--data-dir", str(text_shards), "--out", str(out)])
    assert "trained on 4,0" in capsys.readouterr().out       # stopped at --max_chars (plus one document)
    assert Tokenizer.from_directory(out).get_vocab_size() == 8192
    rows = tok_eval.main(["--tokenizer", str(tiny_tokenizer), "--tokenizer", str(out), "--data-dir", str(text_shards),
                          "--max-docs", "200"])
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and str(out)[-30:] in printed
    ratio = {(Path(r["tokenizer"]).name, r["split"]): r["ratio"] for r in rows}
    assert ratio[("tok8k", "val")] > ratio[(tiny_tokenizer.name, "val")] > 3.0   # a larger vocab compresses more
    with pytest.raises(ValueError, match="need at least 2 shards"):
        tok_train.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "x")])


def test_iter_texts_reports_and_skips_an_unreadable_shard(text_shards: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from nanochat.dataset import iter_texts

    good = list_parquet_files(text_shards)[:2]
    broken = tmp_path / "shard_00007.parquet"
    broken.write_bytes(good[1].read_bytes()[:5000])
    texts = list(iter_texts([good[0], broken, good[1]]))
    assert texts == read_texts(good[0]) + read_texts(good[1])
    assert "shard_00007.parquet: unreadable shard" in capsys.readouterr().err


def test_commands_use_the_base_dir(tmp_path: Path) -> None:
    """The user's path: build shards, train a tokenizer, measure it, all under $NANOCHAT_BASE_DIR."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    env = subprocess_env(NANOCHAT_BASE_DIR=str(tmp_path))
    root = Path(__file__).resolve().parents[1]
    for cmd in (["-m", "nanochat.offline_corpus", "--num-shards", "3", "--max-chars", "300000"],
                ["-m", "scripts.tok_train", "--max_chars=200000", "--vocab_size=1024"],
                ["-m", "scripts.tok_eval", "--max-docs", "20"]):
        done = subprocess.run([sys.executable, *cmd], env=env, cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert [p.name for p in list_parquet_files(tmp_path / "base_data")] == [f"shard_0000{i}.parquet" for i in range(3)]
    assert get_tokenizer(tmp_path / "tokenizer").get_vocab_size() == 1024
    assert re.search(r"1024 +val +\d+ +[\d.]+ +\d+ +[\d.]+", done.stdout)
