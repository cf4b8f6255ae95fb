"""Runs every example in examples/ against a real page store, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import EXT, HANG_GUARD, REPO

EXAMPLES = REPO / "examples"
BUILT_EXAMPLES = Path(os.environ.get("LITEVFS_EXAMPLES_DIR", REPO / "target/release/examples"))


def run(cmd, env, **kw):
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=HANG_GUARD, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def writer(env, name, rows):
    return run([sys.executable, EXAMPLES / "python/writer.py", EXT, name, rows], env())


def test_shell_session(env):
    script = (EXAMPLES / "shell_session.sql").read_text()
    out = run(["sqlite3", "-cmd", f".load {EXT}"], env(), input=script)
    assert "notes: 1" in out
    assert "last: written through litevfs" in out
    # A second session (new process, new cache) sees the first one's row and adds its own.
    out = run(["sqlite3", "-cmd", f".load {EXT}"], env(), input=script)
    assert "notes: 2" in out


def test_python_writer_then_reader(env):
    assert "wrote 5 rows; app-example now has 5" in writer(env, "app-example", 5)
    out = run([sys.executable, EXAMPLES / "python/reader.py", EXT, "app-example", 5], env())
    assert "saw 5 rows; last: event 4" in out


def test_python_reader_sees_concurrent_writer(env):
    writer(env, "live", 1)
    reader = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "python/reader.py"), EXT, "live", "4"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    writer(env, "live", 3)
    out, err = reader.communicate(timeout=HANG_GUARD)
    assert reader.returncode == 0, err
    assert "saw 4 rows; last: event 2" in out


def test_rusqlite_reader(env):
    writer(env, "rs", 3)
    out = run([BUILT_EXAMPLES / "rusqlite_reader", EXT, "rs", "SELECT id, msg FROM events ORDER BY id"], env())
    assert out.splitlines() == ["1|event 0", "2|event 1", "3|event 2"]
