-- A sqlite3 shell session against litevfs. Run it with the extension loaded first:
--
--   LITEFS_CLOUD_HOST=http://127.0.0.1:20202 \
--     sqlite3 -cmd '.load target/release/liblitevfs.so' < examples/shell_session.sql
--
-- It creates (or reuses) the database `shell-example`, writes under the lease, and reads back.
.bail on
.mode list
.open file:shell-example?vfs=litevfs

-- Writes need the lease; it also brings the database to the store's latest position.
PRAGMA litevfs_acquire_lease;
CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL);
INSERT INTO notes(body) VALUES ('written through litevfs');
PRAGMA litevfs_release_lease;

-- Reads need no lease: pages come from the local cache, misses from the page store.
SELECT 'notes: ' || count(*) FROM notes;
SELECT 'last: ' || body FROM notes ORDER BY id DESC LIMIT 1;
PRAGMA litevfs_position;
