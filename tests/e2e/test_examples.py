"""Runs every example in examples/ against a real page store, as a user would.

The Node.js, Go and PHP examples run where their toolchain is installed (see toolchains.py):
the fixtures build them (npm ci for better-sqlite3, go build offline in GOPATH mode), and a
missing toolchain skips their tests with the reason. Besides each example's working pattern,
the tests show the host quirk it works around, as it is.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import toolchains
from conftest import EXT, HANG_GUARD, REPO, shell

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


# --- Examples in other languages: each runs where its toolchain is installed (toolchains.py). ---

TOOLCHAINS = toolchains.status()
BUILD_GUARD = 900  # a from-source build of better-sqlite3 takes a minute or two on two cores


def need(name):
    """Skips the test when the example's toolchain is missing, or fails it if it is required."""
    ok, why = TOOLCHAINS[name]
    if ok:
        return
    if name in toolchains.required():
        pytest.fail(f"{name} example required by LITEVFS_EXAMPLES_REQUIRED, but {why}")
    pytest.skip(f"{name} example skipped: {why}")


def build(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=BUILD_GUARD, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"


NODE_DIR = EXAMPLES / "node"


@pytest.fixture(scope="session")
def node_app():
    """`node examples/node/app.js`, with better-sqlite3 installed there (npm ci when missing or
    built for another Node)."""
    need("node")
    probe = ["node", "-e", "require('better-sqlite3')(':memory:').close()"]
    if subprocess.run(probe, cwd=NODE_DIR, capture_output=True).returncode != 0:
        env = dict(os.environ)
        prefix = toolchains.node_dir()
        if prefix and "npm_config_nodedir" not in env:
            env["npm_config_nodedir"] = str(prefix)  # node-gyp uses these headers, no download
        build(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, env=env)
    return ["node", NODE_DIR / "app.js"]


def node_script(script, env, cwd, *args):
    """Runs a Node script that can require('better-sqlite3') from the example's node_modules."""
    full = {**env, "NODE_PATH": str(NODE_DIR / "node_modules")}
    args = [Path(a).resolve() if a == EXT else a for a in args]  # cwd is elsewhere
    return subprocess.run(
        ["node", "-e", script, "--", *map(str, args)], env=full, cwd=cwd, capture_output=True, text=True,
        timeout=HANG_GUARD,
    )


def test_node_writer_then_python_reader(env, node_app):
    assert "wrote 5 rows; node-example now has 5" in run([*node_app, "write", EXT, "node-example", 5], env())
    out = run([sys.executable, EXAMPLES / "python/reader.py", EXT, "node-example", 5], env())
    assert "saw 5 rows; last: event 4" in out


def test_node_reader_sees_concurrent_python_writer(env, node_app):
    writer(env, "node-live", 1)
    reader = subprocess.Popen(
        [*map(str, node_app), "read", EXT, "node-live", "4"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    writer(env, "node-live", 3)
    out, err = reader.communicate(timeout=HANG_GUARD)
    assert reader.returncode == 0, err
    assert "saw 4 rows; last: event 2" in out


LOAD_THEN_OPEN = """
const Database = require('better-sqlite3');
const [ext, name, entry] = process.argv.slice(1);
const loader = new Database(':memory:');
loader.loadExtension(ext, ...(entry ? [entry] : []));
const db = new Database(name);
db.pragma('litevfs_acquire_lease');
db.exec('CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, msg TEXT)');
db.prepare('INSERT INTO events(msg) VALUES (?)').run('from node');
db.pragma('litevfs_release_lease');
console.log('rows', db.prepare('SELECT count(*) FROM events').pluck().get());
"""


def test_node_file_uri_without_the_default_switch_is_a_local_file(env, node_app, tmp_path):
    """The quirk docs/vfs.md warns about: better-sqlite3 has URIs off, so this name is a file name."""
    uri = "file:node-quirk?vfs=litevfs"
    r = node_script(LOAD_THEN_OPEN, env(), tmp_path, EXT, uri)
    # The lease pragma is an unknown pragma to the local file, which SQLite ignores silently.
    assert r.returncode == 0, r.stderr
    assert (tmp_path / uri).is_file()
    r = shell(".open file:node-quirk?vfs=litevfs&mode=ro\nselect count(*) from events;", env())
    assert "does not exist in the page store" in r.stderr, r.stderr


def test_node_default_vfs_by_entry_point_or_environment(env, node_app, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = node_script(LOAD_THEN_OPEN, env(), cwd, EXT, "node-default", "sqlite3_litevfs_default_init")
    assert r.returncode == 0 and r.stdout.split() == ["rows", "1"], r.stderr
    r = node_script(LOAD_THEN_OPEN, env(LITEVFS_DEFAULT_VFS="1"), cwd, EXT, "node-default")
    assert r.returncode == 0 and r.stdout.split() == ["rows", "2"], r.stderr
    assert list(cwd.iterdir()) == []  # no local file of either name
    out = run([sys.executable, EXAMPLES / "python/reader.py", EXT, "node-default", 2], env())
    assert "saw 2 rows; last: from node" in out
    r = node_script(LOAD_THEN_OPEN, env(LITEVFS_DEFAULT_VFS="sure"), cwd, EXT, "node-default")
    assert r.returncode != 0
    assert 'invalid LITEVFS_DEFAULT_VFS "sure"' in r.stderr, r.stderr
    assert list(cwd.iterdir()) == []


@pytest.fixture(scope="session")
def go_app(tmp_path_factory):
    """The Go example, built offline in GOPATH mode against Debian's mattn/go-sqlite3."""
    need("go")
    return go_build(EXAMPLES / "go", tmp_path_factory.mktemp("go") / "litevfs-go")


def go_build(src, out):
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(toolchains.go_path()), "GOFLAGS": "", "GOPROXY": "off"}
    build(["go", "build", "-o", out, "."], cwd=src, env=env)
    return out


def test_go_writer_then_reader(env, go_app):
    assert "wrote 3 rows; go-example now has 3" in run([go_app, "write", EXT, "go-example", 3], env())
    assert "saw 3 rows; last: event 2" in run([go_app, "read", EXT, "go-example", 3], env())
    out = run([sys.executable, EXAMPLES / "python/reader.py", EXT, "go-example", 3], env())
    assert "saw 3 rows; last: event 2" in out


def test_go_reader_sees_concurrent_python_writer(env, go_app):
    writer(env, "go-live", 1)
    reader = subprocess.Popen(
        [str(go_app), "read", EXT, "go-live", "4"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    writer(env, "go-live", 3)
    out, err = reader.communicate(timeout=HANG_GUARD)
    assert reader.returncode == 0, err
    assert "saw 4 rows; last: event 2" in out


GO_WITHOUT_LOADER = """package main

import (
	"database/sql"
	"fmt"
	"os"

	"github.com/mattn/go-sqlite3"
)

func main() {
	sql.Register("sqlite3_litevfs", &sqlite3.SQLiteDriver{Extensions: []string{os.Args[1]}})
	db, _ := sql.Open("sqlite3_litevfs", "file:"+os.Args[2]+"?vfs=litevfs")
	fmt.Println(db.Ping())
	fmt.Println(db.Ping())
}
"""


def test_go_vfs_name_fails_until_a_connection_loaded_the_extension(env, go_app, tmp_path):
    """The quirk the Go example works around: mattn loads Extensions after the open."""
    writer(env, "go-quirk", 1)
    src = tmp_path / "quirk"
    src.mkdir()
    (src / "main.go").write_text(GO_WITHOUT_LOADER)
    out = run([go_build(src, tmp_path / "quirk-bin"), EXT, "go-quirk"], env())
    assert out.splitlines() == ["no such vfs: litevfs"] * 2


def php_app():
    need("php")
    ext_dir = Path(EXT).resolve().parent
    return ["php", "-d", f"sqlite3.extension_dir={ext_dir}", EXAMPLES / "php/app.php"]


def test_php_writer_then_reader(env):
    php = php_app()
    assert "wrote 4 rows; php-example now has 4" in run([*php, "write", EXT, "php-example", 4], env())
    assert "saw 4 rows; last: event 3" in run([*php, "read", EXT, "php-example", 4], env())
    out = run([sys.executable, EXAMPLES / "python/reader.py", EXT, "php-example", 4], env())
    assert "saw 4 rows; last: event 3" in out


def test_php_needs_the_absolute_extension_dir(env):
    php = php_app()
    php[2] = "sqlite3.extension_dir=/nonexistent"
    res = subprocess.run([*map(str, php), "read", EXT, "x", "1"], env=env(), capture_output=True, text=True,
                         timeout=HANG_GUARD)
    assert res.returncode == 1
    assert f"run with php -d sqlite3.extension_dir={Path(EXT).resolve().parent}" in res.stderr, res.stderr


PHP_SQLITE3_CLASS = """
$loader = new SQLite3(':memory:');
$loader->loadExtension(basename($argv[1]));
foreach (array_slice($argv, 2) as $name) {
    try {
        $db = new SQLite3($name);
        $db->exec('CREATE TABLE IF NOT EXISTS t(x)');
        echo "opened\\n";
    } catch (Exception $e) {
        echo $e->getMessage(), "\\n";
    }
}
"""


def test_php_sqlite3_class_cannot_open_litevfs_databases(env, tmp_path):
    """Why the PHP example uses PDO: SQLite3 makes every name a path."""
    php = [*php_app()[:3], "-r", PHP_SQLITE3_CLASS, "--", EXT]
    uri = "file:php-quirk?vfs=litevfs"
    out = run([*php, uri], env(), cwd=tmp_path)
    assert out.splitlines() == ["opened"]
    assert (tmp_path / uri).is_file()  # a local file, not the page store
    out = run([*php, "php-quirk"], env(LITEVFS_DEFAULT_VFS="1"), cwd=tmp_path)
    assert out.splitlines() == ["Unable to open database: unable to open database file"]
    assert not (tmp_path / "php-quirk").exists()
