"""Writer half of the apsw example: takes the lease and commits rows to a litevfs database.

    LITEFS_CLOUD_HOST=http://127.0.0.1:20202 python examples/python/writer.py \
        target/release/liblitevfs.so app-example 5

apsw's wheels link SQLite statically; liblitevfs.so registers its VFS through the API routines
the host hands over, so it lands in apsw's SQLite, not in some other copy in the process.
"""

import sys

import apsw


def main(ext: str, name: str, rows: int) -> None:
    loader = apsw.Connection(":memory:")
    loader.enable_load_extension(True)
    loader.load_extension(ext)  # registers the VFS "litevfs" for the whole process

    db = apsw.Connection(
        f"file:{name}?vfs=litevfs",
        flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE,
        # litevfs pragmas act when prepared; apsw's statement cache would replay a stale result.
        statementcachesize=0,
    )
    db.execute("PRAGMA litevfs_acquire_lease")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, msg TEXT)")
        with db:  # one transaction, one LTX upload
            for i in range(rows):
                db.execute("INSERT INTO events(msg) VALUES (?)", (f"event {i}",))
    finally:
        db.execute("PRAGMA litevfs_release_lease")
    total = db.execute("SELECT count(*) FROM events").fetchone()[0]
    print(f"wrote {rows} rows; {name} now has {total}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
