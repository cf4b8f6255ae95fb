"""The extension against `litevfs serve --store s3://` on a real S3 API (moto's server from the
project's .venv, on a free loopback port): a writer and a reader on two servers sharing the
bucket, and a cold point lookup on a 1 GiB database that costs at most (b-tree depth + 3) GETs
to the bucket (the manifest, the image's index with page 1, one look for newer commits, one GET
per b-tree level) while the data directory stays under --cache-size.
"""

import json
import re
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, EXT, HANG_GUARD, Agent, Env, Server, shell

MOTO = Path(sys.executable).with_name("moto_server")
# moto checks that object reads carry credentials, not their signatures.
AUTH = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00"


@pytest.fixture(scope="module")
def moto():
    assert MOTO.exists(), f"{MOTO} missing: cargo xtask test installs moto[server] into .venv"
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    endpoint = None
    for line in proc.stderr:
        m = re.search(r"Running on (http://\S+)", line)
        if m:
            endpoint = m.group(1)
            break
    assert endpoint, "moto_server did not start"
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    yield endpoint
    proc.kill()
    proc.wait()


@pytest.fixture
def bucket(moto, tmp_path, monkeypatch):
    """A new bucket; returns a function starting servers on it, each on its own data dir."""
    name = f"e2e{abs(hash(str(tmp_path))) % 10**12}"
    urllib.request.urlopen(urllib.request.Request(f"{moto}/{name}", method="PUT"), timeout=30).read()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    started = []

    def start(*args):
        s = Server(tmp_path / f"data{len(started)}",
                   ["--store", f"s3://{name}/p", "--aws-endpoint-url", moto, "--s3-path-style", *args]).start()
        started.append(s)
        return s

    start.manifest = lambda db: _get_json(f"{moto}/{name}/p/v1/c/default/{db}/manifest")
    yield start
    for s in started:
        s.stop()


def _get_json(url):
    req = urllib.request.Request(url, headers={"Authorization": AUTH})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError:
        return None


def metrics(server):
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        return r.read().decode()


def bucket_gets(server):
    text = metrics(server)
    return sum(int(v) for v in re.findall(r'litevfs_bucket_requests_total\{op="get(?:_range)?",[^}]*\} (\d+)', text))


def test_writer_and_reader_on_two_servers_of_one_bucket(bucket, tmp_path):
    a, b = bucket(), bucket()
    wenv, renv = Env(a, tmp_path), Env(b, tmp_path)
    r = shell("""
.open file:shared?vfs=litevfs
pragma litevfs_acquire_lease;
create table t(x integer primary key, y text);
with recursive s(i) as (select 1 union all select i + 1 from s where i < 500)
insert into t(y) select 'row ' || i from s;
pragma litevfs_release_lease;
""", wenv())
    assert r.returncode == 0, r.stderr
    reader = Agent(renv())
    assert reader.sql("shared", "select count(*), max(x) from t") == [[500, 500]]
    r = shell("""
.open file:shared?vfs=litevfs
pragma litevfs_acquire_lease;
insert into t(y) values ('through server A');
pragma litevfs_release_lease;
""", wenv())
    assert r.returncode == 0, r.stderr
    # The reader's poller long-polls server B, which learns of A's commit from the bucket.
    deadline = time.monotonic() + HANG_GUARD
    while reader.one("shared", "select count(*) from t") != 501:
        assert time.monotonic() < deadline, "the reader never saw the commit made through the other server"
        time.sleep(0.05)
    assert reader.one("shared", "select y from t where x = 501") == "through server A"
    reader.kill()


def _btree_depth(path, root):
    """Pages from the root of a table b-tree to a leaf (leftmost path)."""
    with open(path, "rb") as f:
        ps = struct.unpack(">H", f.read(18)[16:18])[0]
        ps = 65536 if ps == 1 else ps
        depth, pgno = 0, root
        while True:
            f.seek((pgno - 1) * ps)
            page = f.read(ps)
            hdr = page[100:] if pgno == 1 else page
            depth += 1
            if hdr[0] == 0x0D:
                return depth
            assert hdr[0] == 0x05, f"page {pgno} is not a table b-tree page"
            first_cell = struct.unpack(">H", hdr[12:14])[0]
            pgno = struct.unpack(">I", page[first_cell:first_cell + 4])[0]


def _dir_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def test_cold_point_lookup_on_a_1gib_database(bucket, tmp_path):
    src = tmp_path / "big.db"
    con = sqlite3.connect(src)
    con.executescript("pragma journal_mode=off; pragma synchronous=off; pragma page_size=4096;"
                      "create table t(id integer primary key, body blob);")
    rows = 262_144
    con.executemany("insert into t values (?, ?)",
                    ((i, str(i).encode() + bytes(3990)) for i in range(1, rows + 1)))
    con.commit()
    con.close()
    size = src.stat().st_size
    assert size >= 1 << 30, size
    depth = _btree_depth(src, 2)
    writer = bucket("--max-body-size", "2GiB")
    out = subprocess.run([BIN, "import", "big", str(src), "--host", writer.url], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    src.unlink()
    # Compaction on the importing server lists the image in the manifest (one GET to open).
    deadline = time.monotonic() + HANG_GUARD
    while not (bucket.manifest("big") or {}).get("base"):
        assert time.monotonic() < deadline, "the import never became the manifest's base"
        time.sleep(0.2)
    # A long poll interval on the reader's server: the extension long-polls for changes, and a
    # watched database is checked for other servers' commits every --poll-interval (one GET
    # each); that cost is per second of watching, not per lookup (cargo xtask bench reports it).
    reader = bucket("--cache-size", "64MiB", "--poll-interval", "60s")
    before = bucket_gets(reader)
    r = shell(".open file:big?vfs=litevfs\nselect substr(body, 1, 6) from t where id = 200000;",
              Env(reader, tmp_path)())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().encode().startswith(b"200000"), r.stdout
    gets = bucket_gets(reader) - before
    assert gets <= depth + 3, f"{gets} GETs for a point lookup in a b-tree of depth {depth}"
    cache = _dir_bytes(reader.data_dir)
    assert cache < 64 << 20, f"the data dir holds {cache} bytes"
