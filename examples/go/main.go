// Command litevfs-go writes to a litevfs database under the write lease and reads it back,
// through database/sql and github.com/mattn/go-sqlite3.
//
//	LITEFS_CLOUD_HOST=http://127.0.0.1:20202 ./litevfs-go write target/release/liblitevfs.so app-example 5
//	LITEFS_CLOUD_HOST=http://127.0.0.1:20202 ./litevfs-go read target/release/liblitevfs.so app-example 5
//
// mattn's driver opens the SQLite connection first and loads the driver's Extensions into it
// afterwards, so a DSN naming vfs=litevfs fails with "no such vfs: litevfs" until some
// connection of the process has loaded the extension. openLitevfs does that with a throwaway
// in-memory connection; after it, every connection may name the VFS. The extension stays
// loaded for the life of the process, whatever happens to the connection that loaded it.
package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/mattn/go-sqlite3"
)

const driverName = "sqlite3_litevfs"

// openLitevfs returns a pool of connections to the page-store database name. Call it once per
// process: sql.Register panics on a second registration of the same driver name.
func openLitevfs(ext, name string, readOnly bool) (*sql.DB, error) {
	// Every new connection loads the extension too: after the first load that only finds the
	// VFS already registered.
	sql.Register(driverName, &sqlite3.SQLiteDriver{Extensions: []string{ext}})

	loader, err := sql.Open(driverName, ":memory:")
	if err != nil {
		return nil, err
	}
	defer loader.Close()
	// sql.Open connects lazily; Ping makes the connection, which loads the extension.
	if err := loader.Ping(); err != nil {
		return nil, fmt.Errorf("loading %s: %w", ext, err)
	}

	mode := "rwc"
	if readOnly {
		mode = "ro"
	}
	return sql.Open(driverName, fmt.Sprintf("file:%s?vfs=litevfs&mode=%s", name, mode))
}

// write takes the lease and commits rows in one transaction (one LTX upload). The lease is per
// process and database, but the pragmas and the transaction share one pinned connection here
// so that the order of events is plain to see.
func write(ext, name string, rows int) error {
	db, err := openLitevfs(ext, name, false)
	if err != nil {
		return err
	}
	defer db.Close()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()

	var lease string
	if err := conn.QueryRowContext(ctx, "PRAGMA litevfs_acquire_lease").Scan(&lease); err != nil {
		return fmt.Errorf("taking the write lease: %w", err)
	}
	err = insert(ctx, conn, rows)
	if _, rerr := conn.ExecContext(ctx, "PRAGMA litevfs_release_lease"); rerr != nil && err == nil {
		err = fmt.Errorf("releasing the write lease: %w", rerr)
	}
	if err != nil {
		return err
	}

	var total int
	if err := conn.QueryRowContext(ctx, "SELECT count(*) FROM events").Scan(&total); err != nil {
		return err
	}
	fmt.Printf("wrote %d rows; %s now has %d\n", rows, name, total)
	return nil
}

func insert(ctx context.Context, conn *sql.Conn, rows int) error {
	if _, err := conn.ExecContext(ctx,
		"CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, msg TEXT)"); err != nil {
		return err
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	for i := 0; i < rows; i++ {
		if _, err := tx.ExecContext(ctx, "INSERT INTO events(msg) VALUES (?)", fmt.Sprintf("event %d", i)); err != nil {
			tx.Rollback()
			return err
		}
	}
	return tx.Commit()
}

// read waits until the database has at least want rows. No reopening is needed: the
// extension's change poller brings new commits to the open connection.
func read(ext, name string, want int) error {
	db, err := openLitevfs(ext, name, true)
	if err != nil {
		return err
	}
	defer db.Close()
	deadline := time.Now().Add(20 * time.Second)
	var count int
	for {
		if err := db.QueryRow("SELECT count(*) FROM events").Scan(&count); err != nil {
			return err
		}
		if count >= want {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out: %d of %d rows", count, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
	var last string
	if err := db.QueryRow("SELECT msg FROM events ORDER BY id DESC LIMIT 1").Scan(&last); err != nil {
		return err
	}
	fmt.Printf("saw %d rows; last: %s\n", count, last)
	return nil
}

func main() {
	if len(os.Args) != 5 || (os.Args[1] != "write" && os.Args[1] != "read") {
		fmt.Fprintln(os.Stderr, "usage: litevfs-go write|read EXTENSION DATABASE ROWS")
		os.Exit(2)
	}
	n, err := strconv.Atoi(os.Args[4])
	if err != nil || n < 0 {
		err = errors.New("ROWS must be a whole number")
	} else if os.Args[1] == "write" {
		err = write(os.Args[2], os.Args[3], n)
	} else {
		err = read(os.Args[2], os.Args[3], n)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "litevfs-go:", err)
		os.Exit(1)
	}
}
