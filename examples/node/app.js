'use strict';
// better-sqlite3 writing to a litevfs database under the write lease, and reading it back.
//
//   npm ci   # builds better-sqlite3 (from source where its prebuilt binary cannot be fetched)
//   LITEFS_CLOUD_HOST=http://127.0.0.1:20202 node app.js write ../../target/release/liblitevfs.so app-example 5
//   LITEFS_CLOUD_HOST=http://127.0.0.1:20202 node app.js read ../../target/release/liblitevfs.so app-example 5
//
// better-sqlite3 compiles its SQLite with URIs off and opens without a VFS name, so
// 'file:NAME?vfs=litevfs' would silently create a local file of that very name. Loading the
// entry point sqlite3_litevfs_default_init makes litevfs the default VFS instead: a plain NAME
// then opens database NAME of the page store (and no local database file can be opened by this
// process any more: see docs/vfs.md).

const Database = require('better-sqlite3');

function openLitevfs(ext, name, readonly) {
  // Any connection can load the extension; it stays loaded, and litevfs stays the default VFS,
  // after this one closes.
  const loader = new Database(':memory:');
  loader.loadExtension(ext, 'sqlite3_litevfs_default_init');
  loader.close();
  // Read-write: a database missing from the store opens empty and is created in the store by
  // its first commit. Read-only: a missing database is an error.
  return new Database(name, { readonly });
}

function write(ext, name, rows) {
  const db = openLitevfs(ext, name, false);
  // db.pragma() prepares the statement afresh each time, as the litevfs pragmas need.
  db.pragma('litevfs_acquire_lease');
  try {
    db.exec('CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, msg TEXT)');
    const insert = db.prepare('INSERT INTO events(msg) VALUES (?)');
    // One transaction: one LTX upload to the page store.
    db.transaction(() => {
      for (let i = 0; i < rows; i++) insert.run(`event ${i}`);
    })();
  } finally {
    db.pragma('litevfs_release_lease');
  }
  const total = db.prepare('SELECT count(*) FROM events').pluck().get();
  console.log(`wrote ${rows} rows; ${name} now has ${total}`);
  db.close();
}

async function read(ext, name, want) {
  const db = openLitevfs(ext, name, true);
  // The extension's change poller brings new commits to the open connection: no reopening.
  const count = db.prepare('SELECT count(*) FROM events').pluck();
  const deadline = Date.now() + 20000;
  let n;
  while ((n = count.get()) < want) {
    if (Date.now() > deadline) throw new Error(`timed out: ${n} of ${want} rows`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const last = db.prepare('SELECT msg FROM events ORDER BY id DESC LIMIT 1').pluck().get();
  console.log(`saw ${n} rows; last: ${last}`);
  db.close();
}

async function main([cmd, ext, name, rows]) {
  const n = Number(rows);
  if (!['write', 'read'].includes(cmd) || !ext || !name || !Number.isInteger(n) || n < 0) {
    console.error('usage: node app.js write|read EXTENSION DATABASE ROWS');
    process.exit(2);
  }
  if (cmd === 'write') write(ext, name, n);
  else await read(ext, name, n);
}

main(process.argv.slice(2)).catch((err) => {
  console.error(`litevfs-node: ${err.message}`);
  process.exit(1);
});
