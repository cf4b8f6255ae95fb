"""Fixtures for the litevfs end-to-end tests.

Every test gets its own `litevfs serve` on a free loopback port with a temporary data
directory (killed at teardown), and runs clients as separate processes with separate
LITEVFS_CACHE_DIRs: the Debian `sqlite3` shell with `.load`, and apsw through `agent.py`.

LITEVFS_BIN and LITEVFS_EXT name the built artifacts (default: target/release in this repo).
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = os.environ.get("LITEVFS_BIN", str(REPO / "target/release/litevfs"))
EXT = os.environ.get("LITEVFS_EXT", str(REPO / "target/release/liblitevfs.so"))
AGENT = Path(__file__).with_name("agent.py")
# Guards against hangs only; tests never assert on timing.
HANG_GUARD = 120


class Server:
    """A `litevfs serve` process; `stop()` and `start()` keep the data directory."""

    def __init__(self, data_dir, args=()):
        self.data_dir = data_dir
        self.args = list(args)
        self.proc = None
        self.url = None
        self.port = 0

    def start(self):
        cmd = [BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        timer = threading.Timer(HANG_GUARD, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    self.port = int(self.url.rsplit(":", 1)[1])
                    break
        finally:
            timer.cancel()
        assert self.url, "litevfs serve did not report its address"
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def upload(self, name, path):
        req = urllib.request.Request(f"{self.url}/db/upload?db={name}", data=Path(path).read_bytes(), method="POST")
        with urllib.request.urlopen(req, timeout=HANG_GUARD) as r:
            return json.loads(r.read())


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "store").start()
    yield s
    s.stop()


@pytest.fixture
def make_server(tmp_path):
    """Starts a server with extra arguments (e.g. tokens)."""
    started = []

    def make(*args):
        s = Server(tmp_path / f"store{len(started)}", args).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


class Env:
    """Client environment: the server's URL and a fresh cache directory per process."""

    def __init__(self, server, tmp_path):
        self.server = server
        self.tmp_path = tmp_path
        self.n = 0

    def __call__(self, cache_dir=None, **extra):
        self.n += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "LITEVFS_"))}
        env["LITEFS_CLOUD_HOST"] = self.server.url
        env["LITEVFS_CACHE_DIR"] = str(cache_dir or self.tmp_path / f"cache{self.n}")
        env["LITEVFS_EXT"] = EXT
        env.update({k: str(v) for k, v in extra.items()})
        return env


@pytest.fixture
def env(server, tmp_path):
    return Env(server, tmp_path)


def shell(sql, env, load=None):
    """Runs the sqlite3 shell with the extension loaded and `sql` on stdin."""
    load = load or f".load {EXT}"
    return subprocess.run(
        ["sqlite3"], input=f"{load}\n{sql}\n", env=env, capture_output=True, text=True, timeout=HANG_GUARD
    )


class Agent:
    """An apsw process (agent.py) driven line by line."""

    def __init__(self, env):
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.stderr = []
        threading.Thread(target=self._drain, daemon=True).start()
        assert self._read()["ready"]

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stderr_with(self, text, timeout=10.0):
        """The agent's stderr so far, once it contains `text` (a background thread collects it,
        so a line the agent just wrote may not be there yet), or as it is after `timeout`."""
        deadline = time.monotonic() + timeout
        while text not in "".join(self.stderr) and time.monotonic() < deadline:
            time.sleep(0.02)
        return "".join(self.stderr)

    def _read(self):
        timer = threading.Timer(HANG_GUARD, self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        assert line, f"agent died: {''.join(self.stderr)}"
        return json.loads(line)

    def run(self, db, sql, ro=False, args=()):
        """Runs SQL; returns the reply dict (ok, rows | error, code)."""
        self.proc.stdin.write(json.dumps({"db": db, "sql": sql, "ro": ro, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def sql(self, db, sql, ro=False, args=()):
        r = self.run(db, sql, ro, args)
        assert r["ok"], r["error"]
        return r["rows"]

    def one(self, db, sql, ro=False):
        return self.sql(db, sql, ro)[0][0]

    def stats(self, db):
        return json.loads(self.one(db, "pragma litevfs_cache_stats"))

    def rss(self, what="peak"):
        """(peak, current) resident memory of the process in KiB; "reset" restarts the peak."""
        self.proc.stdin.write(json.dumps({"rss": what}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        assert r["ok"], r
        return tuple(r["rows"][0])

    def close_db(self, db):
        self.proc.stdin.write(json.dumps({"close": db}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=HANG_GUARD)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def agent(env):
    """Factory of apsw client processes, each with its own cache directory by default."""
    started = []

    def make(**kw):
        a = Agent(env(**kw))
        started.append(a)
        return a

    yield make
    for a in started:
        a.kill()


def make_db(path, sql):
    """Builds a local SQLite file with the stdlib sqlite3 module."""
    con = sqlite3.connect(path)
    con.executescript(sql)
    con.commit()
    con.close()
    return path


@pytest.fixture
def big_db(tmp_path):
    """A ~8 MB database: 20000 rows of 100 random bytes, with an index."""
    return make_db(
        tmp_path / "big.db",
        """
        create table t(id integer primary key, v text);
        with recursive c(x) as (select 1 union all select x + 1 from c where x < 20000)
        insert into t select x, hex(randomblob(100)) from c;
        create index iv on t(v);
        """,
    )


class LossyProxy:
    """A loopback HTTP/1.1 proxy in front of a server that loses replies to `POST /db/tx` on demand.

    Each request goes upstream on its own connection (`Connection: close`, so the reply ends at
    EOF, chunked or not). `lose(n, how)` applies to the next n commits:
      - "reply": the commit reaches the store, its reply is dropped (the connection closes);
      - "request": the commit never reaches the store (the connection closes);
      - "reply-then-down": as "reply", and every later request fails until `up()`.
    """

    def __init__(self, upstream_port):
        import socket

        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.lock = threading.Lock()
        self.plan = []
        self.down = False
        self.lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def lose(self, n, how):
        with self.lock:
            self.plan += [how] * n

    def up(self):
        self.down = False

    def close(self):
        self.sock.close()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _read_request(c):
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = c.recv(65536)
            if not chunk:
                return None
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = [l for l in lines[1:] if not l.lower().startswith("connection:")]
        length = next((int(l.split(":", 1)[1]) for l in headers if l.lower().startswith("content-length:")), 0)
        while len(body) < length:
            chunk = c.recv(65536)
            if not chunk:
                return None
            body += chunk
        return lines[0], headers, body

    def _serve(self, c):
        import socket

        with c:
            while True:
                req = self._read_request(c)
                if req is None or self.down:
                    return
                line, headers, body = req
                how = None
                if line.startswith("POST /db/tx"):
                    with self.lock:
                        how = self.plan.pop(0) if self.plan else None
                if how == "request":
                    self.lost += 1
                    return
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=HANG_GUARD)
                with up:
                    up.sendall(("\r\n".join([line, *headers, "Connection: close"]) + "\r\n\r\n").encode("latin-1") + body)
                    resp = b""
                    while chunk := up.recv(65536):
                        resp += chunk
                if how is not None:
                    self.lost += 1
                    if how == "reply-then-down":
                        self.down = True
                    return
                c.sendall(resp)
                return


@pytest.fixture
def lossy(server):
    p = LossyProxy(server.port)
    yield p
    p.close()
