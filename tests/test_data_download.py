"""`python -m nanochat.dataset`: parallel, resumable (HTTP Range), atomic, verified downloads, against a local
HTTP server that serves real parquet shards and misbehaves the way networks do."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nanochat import dataset
from nanochat.dataset import download, list_parquet_files
from nanochat.offline_corpus import write_shards


class ShardServer:
    """Serves {name: bytes} with Range support. Per-file faults, each used up once unless `always`:
    "break": the connection drops after half the body; "corrupt": garbled bytes with a valid length."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []     # (name, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                faults = server.faults.get(name, [])
                fault = faults[0] if faults else None
                if fault and not fault.endswith("!"):
                    faults.pop(0)
                start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                if fault and fault.startswith("corrupt"):
                    body = body[:100] + bytes(b ^ 0x5A for b in body[100:-100]) + body[-100:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if fault and fault.startswith("break"):
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/fineweb"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.requests if n == name]


@pytest.fixture(scope="module")
def source_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    paths = write_shards(tmp_path_factory.mktemp("source"), num_shards=4, max_chars=2_000_000)
    return {p.name: p.read_bytes() for p in paths}


@pytest.fixture
def server(source_shards: dict[str, bytes]) -> Iterator[ShardServer]:
    srv = ShardServer(dict(source_shards))
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_parallel_download_survives_a_broken_connection_and_a_corrupt_file(server: ShardServer,
                                                                          tmp_path: Path) -> None:
    server.faults = {"shard_00001.parquet": ["break"], "shard_00002.parquet": ["corrupt"]}
    results = download(4, tmp_path, server.url, workers=3, available=4, backoff_s=0, progress=False)
    assert all(r.ok for r in results), [r.message for r in results]
    assert [p.name for p in list_parquet_files(tmp_path)] == sorted(server.files)
    for p in list_parquet_files(tmp_path):
        assert p.read_bytes() == server.files[p.name]
    assert not list(tmp_path.glob("*.partial"))
    first, resumed = server.requests_for("shard_00001.parquet")
    start = int(re.fullmatch(r"bytes=(\d+)-", resumed).group(1))               # resumed, not restarted
    assert first is None and 0 < start <= len(server.files["shard_00001.parquet"]) // 2
    assert server.requests_for("shard_00002.parquet") == [None, None]               # corrupt: fetched again
    # a second run finds everything in place and asks the server nothing
    before = len(server.requests)
    assert all(r.message == "present" for r in download(4, tmp_path, server.url, available=4, progress=False))
    assert len(server.requests) == before


def test_interrupted_download_resumes_from_the_partial_file(server: ShardServer, tmp_path: Path) -> None:
    body = server.files["shard_00000.parquet"]
    (tmp_path / "shard_00000.parquet.partial").write_bytes(body[:1000])   # left by a killed earlier run
    [result] = download(1, tmp_path, server.url, available=4, backoff_s=0, progress=False)
    assert result.ok and result.bytes_downloaded == len(body) - 1000
    assert server.requests_for("shard_00000.parquet") == ["bytes=1000-"]
    assert (tmp_path / "shard_00000.parquet").read_bytes() == body


def test_a_file_that_stays_corrupt_is_reported_and_never_kept(server: ShardServer, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    server.faults = {"shard_00001.parquet": ["corrupt!"]}
    code = dataset.main(["-n", "2", "--base-url", server.url, "--data-dir", str(tmp_path), "--available", "4",
                         "--retry-wait", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"shard_00001\.parquet: failed after \d+ attempts: shard_00001\.parquet .*not a valid shard", err)
    assert [p.name for p in list_parquet_files(tmp_path)] == ["shard_00000.parquet"]
    assert not list(tmp_path.glob("*.partial"))
    assert len(server.requests_for("shard_00001.parquet")) == dataset.ATTEMPTS


def test_asking_for_more_shards_than_exist(server: ShardServer, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"asked for 5 shards, but the source has 4 \(shard_00000 .. shard_00003\)"):
        download(5, tmp_path, server.url, available=4, progress=False)
    assert dataset.main(["-n", "2000", "--data-dir", str(tmp_path)]) == 2
    assert "the source has 1823" in capsys.readouterr().err
    # a mirror that holds fewer shards than assumed: the 404 says how many it seems to have
    code = dataset.main(["-n", "6", "--base-url", server.url, "--data-dir", str(tmp_path), "--available", "10",
                         "--retry-wait", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "the source has no shard_00004.parquet: it seems to hold 4 shards" in err
    assert len(list_parquet_files(tmp_path)) == 4
