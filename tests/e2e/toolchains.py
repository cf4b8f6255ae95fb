"""Which example toolchains this machine has, and how each example is built.

The Node, Go and PHP examples run only where their toolchain is installed; `status()` says, for
each, whether it can run and, when it cannot, why and which packages bring it. The end-to-end
tests skip an example that cannot run, with that reason, unless LITEVFS_EXAMPLES_REQUIRED names
it (comma-separated, e.g. `node,go,php`: CI sets it), in which case the test fails instead.
`cargo xtask test` runs this file as a script to print the same verdicts before the tests.

The Go example builds offline, in GOPATH mode, against the mattn/go-sqlite3 sources that
Debian's golang-github-mattn-go-sqlite3-dev puts under /usr/share/gocode (or any GOPATH entry
that has them).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

MATTN = Path("src/github.com/mattn/go-sqlite3")
GO_HINT = "apt-get install golang-go golang-github-mattn-go-sqlite3-dev"
PHP_HINT = "apt-get install php-cli php-sqlite3"
NODE_MAJOR = 20  # better-sqlite3 12 supports Node 20 and later


def _output(cmd):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def go_path():
    """The GOPATH entry holding mattn/go-sqlite3's sources, or None."""
    entries = (_output(["go", "env", "GOPATH"]) or "").strip().split(os.pathsep)
    for entry in [*filter(None, entries), "/usr/share/gocode"]:
        if (Path(entry) / MATTN / "sqlite3.go").is_file():
            return Path(entry)
    return None


def node_dir():
    """The install prefix of the running node when it ships its own C headers (node-gyp then
    builds better-sqlite3 without downloading them), else None."""
    exe = shutil.which("node")
    if not exe:
        return None
    prefix = Path(os.path.realpath(exe)).parent.parent
    return prefix if (prefix / "include/node/node_version.h").is_file() else None


def _node():
    missing = [t for t in ("node", "npm") if not shutil.which(t)]
    if missing:
        return None, f"{' and '.join(missing)} not found (Node.js {NODE_MAJOR} or later, with npm)"
    version = (_output(["node", "--version"]) or "").strip()
    m = re.match(r"v(\d+)\.", version)
    if not m or int(m.group(1)) < NODE_MAJOR:
        return None, f"node {version or '?'} is older than {NODE_MAJOR} (better-sqlite3 12 needs {NODE_MAJOR}+)"
    return f"node {version}, better-sqlite3 built with npm", None


def _go():
    if not shutil.which("go"):
        return None, f"go not found ({GO_HINT})"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return None, "no C compiler for cgo (apt-get install gcc)"
    path = go_path()
    if path is None:
        return None, f"mattn/go-sqlite3 sources not found in GOPATH or /usr/share/gocode ({GO_HINT})"
    version = (_output(["go", "env", "GOVERSION"]) or "go").strip()
    return f"{version}, mattn/go-sqlite3 from {path}", None


def _php():
    if not shutil.which("php"):
        return None, f"php not found ({PHP_HINT})"
    modules = {m.strip().lower() for m in (_output(["php", "-m"]) or "").splitlines()}
    missing = [m for m in ("sqlite3", "pdo_sqlite") if m not in modules]
    if missing:
        return None, f"php lacks {' and '.join(missing)} ({PHP_HINT})"
    version = (_output(["php", "-r", "echo PHP_VERSION;"]) or "?").strip()
    return f"php {version}, PDO and SQLite3", None


CHECKS = {"node": _node, "go": _go, "php": _php}


def status():
    """{name: (what runs, None) or (None, why it cannot)} for every example toolchain."""
    return {name: check() for name, check in CHECKS.items()}


def required():
    names = os.environ.get("LITEVFS_EXAMPLES_REQUIRED", "")
    return {n.strip() for n in names.split(",") if n.strip()}


def main():
    need = required()
    unknown = need - CHECKS.keys()
    if unknown:
        print(f"LITEVFS_EXAMPLES_REQUIRED names unknown examples: {', '.join(sorted(unknown))}")
        return 1
    failed = False
    for name, (ok, why) in status().items():
        if ok:
            print(f"    {name:4} example: runs ({ok})")
        elif name in need:
            print(f"    {name:4} example: REQUIRED but cannot run: {why}")
            failed = True
        else:
            print(f"    {name:4} example: skipped: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
