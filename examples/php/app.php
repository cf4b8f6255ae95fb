<?php
// PHP writing to a litevfs database under the write lease through PDO, and reading it back.
//
//   LITEFS_CLOUD_HOST=http://127.0.0.1:20202 php -d sqlite3.extension_dir=$PWD/target/release \
//     examples/php/app.php write target/release/liblitevfs.so app-example 5
//   LITEFS_CLOUD_HOST=http://127.0.0.1:20202 php -d sqlite3.extension_dir=$PWD/target/release \
//     examples/php/app.php read target/release/liblitevfs.so app-example 5
//
// Two PHP quirks shape this file:
// - The SQLite3 class cannot open a litevfs database: it turns every name into an absolute
//   path, so 'file:NAME?vfs=litevfs' silently becomes a local file of that name, and with
//   litevfs as the default VFS a plain NAME becomes a path, which litevfs refuses. PDO passes
//   'file:' URIs to SQLite as URIs (PHP 8.1 and later), so the database is opened with PDO.
// - PDO cannot load extensions before PHP 8.4 (Pdo\Sqlite::loadExtension), and SQLite3 can
//   only load them from the directory in the ini setting sqlite3.extension_dir (an absolute
//   path, which a script cannot change), and only with the default entry point. Both classes use the same libsqlite3 of the process, so an SQLite3
//   connection loads the extension and the VFS is there for PDO.

declare(strict_types=1);

function open_litevfs(string $ext, string $name, bool $readOnly): PDO
{
    // SQLite3 compares the resolved path of the library with the setting as written, so the
    // setting must be the directory's absolute, resolved path.
    $dir = realpath(dirname($ext));
    if ($dir === false || rtrim((string) ini_get('sqlite3.extension_dir'), '/') !== $dir) {
        throw new RuntimeException(sprintf(
            'run with php -d sqlite3.extension_dir=%s: SQLite3 loads extensions only from there',
            $dir === false ? dirname($ext) : $dir
        ));
    }
    $loader = new SQLite3(':memory:');
    $loader->enableExceptions(true);
    $loader->loadExtension(basename($ext)); // entry point sqlite3_litevfs_init
    $loader->close(); // the extension stays loaded for the life of the process

    $mode = $readOnly ? 'ro' : 'rwc';
    // PDO throws on errors (the default since PHP 8.0); it keeps no statement cache, so the
    // litevfs pragmas run each time they are queried.
    return new PDO("sqlite:file:{$name}?vfs=litevfs&mode={$mode}");
}

function write(string $ext, string $name, int $rows): void
{
    $db = open_litevfs($ext, $name, false);
    $db->query('PRAGMA litevfs_acquire_lease')->fetchAll();
    try {
        $db->exec('CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, msg TEXT)');
        $insert = $db->prepare('INSERT INTO events(msg) VALUES (?)');
        $db->beginTransaction(); // one transaction: one LTX upload to the page store
        for ($i = 0; $i < $rows; $i++) {
            $insert->execute(["event {$i}"]);
        }
        $db->commit();
    } finally {
        if ($db->inTransaction()) {
            $db->rollBack();
        }
        $db->query('PRAGMA litevfs_release_lease')->fetchAll();
    }
    $total = $db->query('SELECT count(*) FROM events')->fetchColumn();
    echo "wrote {$rows} rows; {$name} now has {$total}\n";
}

function read(string $ext, string $name, int $want): void
{
    $db = open_litevfs($ext, $name, true);
    // The extension's change poller brings new commits to the open connection: no reopening.
    $deadline = microtime(true) + 20;
    while (($count = (int) $db->query('SELECT count(*) FROM events')->fetchColumn()) < $want) {
        if (microtime(true) > $deadline) {
            throw new RuntimeException("timed out: {$count} of {$want} rows");
        }
        usleep(50000);
    }
    $last = $db->query('SELECT msg FROM events ORDER BY id DESC LIMIT 1')->fetchColumn();
    echo "saw {$count} rows; last: {$last}\n";
}

[$cmd, $ext, $name, $rows] = array_pad(array_slice($argv, 1), 4, null);
if (!in_array($cmd, ['write', 'read'], true) || !$ext || !$name || !ctype_digit((string) $rows)) {
    fwrite(STDERR, "usage: php -d sqlite3.extension_dir=DIR app.php write|read EXTENSION DATABASE ROWS\n");
    exit(2);
}
try {
    $cmd === 'write' ? write($ext, $name, (int) $rows) : read($ext, $name, (int) $rows);
} catch (Throwable $e) {
    fwrite(STDERR, 'litevfs-php: ' . $e->getMessage() . "\n");
    exit(1);
}
