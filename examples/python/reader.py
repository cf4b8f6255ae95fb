"""Reader half of the apsw example: opens a litevfs database lazily and waits for rows.

    LITEFS_CLOUD_HOST=http://127.0.0.1:20202 python examples/python/reader.py \
        target/release/liblitevfs.so app-example 5

It keeps one connection open and polls; the extension's background syncer drops pages that
changed in the store, so new commits show up without reopening.
"""

import sys
import time

import apsw


def main(ext: str, name: str, want: int, timeout: float = 20.0) -> None:
    loader = apsw.Connection(":memory:")
    loader.enable_load_extension(True)
    loader.load_extension(ext)

    db = apsw.Connection(
        f"file:{name}?vfs=litevfs",
        flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY,
        statementcachesize=0,
    )
    deadline = time.monotonic() + timeout
    while True:
        count = db.execute("SELECT count(*) FROM events").fetchone()[0]
        if count >= want:
            break
        if time.monotonic() > deadline:
            sys.exit(f"timed out: {count} of {want} rows")
        time.sleep(0.05)
    last = db.execute("SELECT msg FROM events ORDER BY id DESC LIMIT 1").fetchone()[0]
    print(f"saw {count} rows; last: {last}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
