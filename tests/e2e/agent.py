"""A litevfs client process driven over stdin/stdout, for the end-to-end tests.

Loads liblitevfs.so into apsw (SQLite linked statically into the wheel), then reads one JSON
command per line and answers one JSON line:

  {"db": "NAME", "sql": "...", "ro": false}  ->  {"ok": true, "rows": [[...], ...]}
                                             or {"ok": false, "error": "...", "code": N}
  {"close": "NAME"}                          ->  {"ok": true}
  {"rss": "peak" | "reset"}                  ->  {"ok": true, "rows": [[peak KiB, current KiB]]}
                                                 ("reset" restarts the peak from the current size)

Environment: LITEVFS_EXT (the extension), plus the litevfs variables (LITEFS_CLOUD_HOST, ...).
"""

import json
import os
import sys

import apsw

loader = apsw.Connection(":memory:")
loader.enable_load_extension(True)
loader.load_extension(os.environ["LITEVFS_EXT"])

conns = {}


def connect(name, ro):
    key = (name, ro)
    if key not in conns:
        flags = apsw.SQLITE_OPEN_URI
        flags |= apsw.SQLITE_OPEN_READONLY if ro else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        # statementcachesize=0: litevfs pragmas run when a statement is prepared.
        c = apsw.Connection(f"file:{name}?vfs=litevfs", flags=flags, statementcachesize=0)
        c.setbusytimeout(5000)
        conns[key] = c
    return conns[key]


def memory(what):
    if what == "reset":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return [[int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0])]]


def handle(cmd):
    if "rss" in cmd:
        return {"ok": True, "rows": memory(cmd["rss"])}
    if "close" in cmd:
        for key in [k for k in conns if k[0] == cmd["close"]]:
            conns.pop(key).close()
        return {"ok": True}
    c = connect(cmd["db"], cmd.get("ro", False))
    rows = [list(r) for r in c.execute(cmd["sql"], cmd.get("args", [])).fetchall()]
    return {"ok": True, "rows": rows}


print(json.dumps({"ok": True, "ready": True}), flush=True)
for line in sys.stdin:
    try:
        out = handle(json.loads(line))
    except Exception as e:  # reported to the test, which decides
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "code": getattr(e, "extendedresult", None)}
    print(json.dumps(out, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)), flush=True)
