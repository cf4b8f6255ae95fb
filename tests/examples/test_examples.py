"""Runs every example in examples/ against a real page store, as a user would."""

import pathlib
import subprocess
import sys

ROOT_EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def run(cmd, env, **kw):
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_shell_session(ext_path, client_env):
    script = (ROOT_EXAMPLES / "shell_session.sql").read_text()
    out = run(["sqlite3", "-cmd", f".load {ext_path}"], client_env("shell"), input=script)
    assert "notes: 1" in out
    assert "last: written through litevfs" in out
    # A second session (new process, new cache) sees the first one's row and adds its own.
    out = run(["sqlite3", "-cmd", f".load {ext_path}"], client_env("shell2"), input=script)
    assert "notes: 2" in out


def test_python_writer_then_reader(ext_path, client_env):
    py = sys.executable
    out = run([py, ROOT_EXAMPLES / "python/writer.py", ext_path, "app-example", "5"], client_env("w"))
    assert "wrote 5 rows; app-example now has 5" in out
    out = run([py, ROOT_EXAMPLES / "python/reader.py", ext_path, "app-example", "5"], client_env("r"))
    assert "saw 5 rows; last: event 4" in out


def test_python_reader_sees_concurrent_writer(ext_path, client_env):
    py = sys.executable
    run([py, ROOT_EXAMPLES / "python/writer.py", ext_path, "live", "1"], client_env("w0"))
    reader = subprocess.Popen(
        [py, ROOT_EXAMPLES / "python/reader.py", ext_path, "live", "4"],
        env=client_env("r"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    run([py, ROOT_EXAMPLES / "python/writer.py", ext_path, "live", "3"], client_env("w1"))
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert "saw 4 rows; last: event 2" in out


def test_rusqlite_reader(ext_path, examples_dir, client_env):
    run([sys.executable, ROOT_EXAMPLES / "python/writer.py", ext_path, "rs", "3"], client_env("w"))
    out = run(
        [examples_dir / "rusqlite_reader", ext_path, "rs", "SELECT id, msg FROM events ORDER BY id"],
        client_env("rs"),
    )
    assert out.splitlines() == ["1|event 0", "2|event 1", "3|event 2"]
