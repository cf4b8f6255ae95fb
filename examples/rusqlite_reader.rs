//! A Rust host with its own (bundled, statically linked) SQLite that loads liblitevfs.so and
//! queries a litevfs database.
//!
//! ```text
//! LITEFS_CLOUD_HOST=http://127.0.0.1:20202 \
//!   cargo run --release --example rusqlite_reader -- target/release/liblitevfs.so NAME "SELECT 1"
//! ```
//!
//! Prints each row of the query's result, columns separated by `|`.

use rusqlite::{Connection, LoadExtensionGuard, OpenFlags};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, ext, name, sql] = args.as_slice() else {
        return Err("usage: rusqlite_reader EXTENSION_PATH DATABASE SQL".into());
    };

    // Loading registers the VFS "litevfs" in this process's SQLite (the bundled one).
    let loader = Connection::open_in_memory()?;
    // SAFETY: we load our own extension, built from this repository.
    unsafe {
        let _guard = LoadExtensionGuard::new(&loader)?;
        loader.load_extension(ext, None::<&str>)?;
    }

    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
    let db = Connection::open_with_flags_and_vfs(name, flags, c"litevfs")?;
    let mut stmt = db.prepare(sql)?;
    let cols = stmt.column_count();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let vals: Vec<String> = (0..cols)
            .map(|i| match row.get_ref(i) {
                Ok(v) => match v {
                    rusqlite::types::ValueRef::Null => "NULL".to_string(),
                    rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                    rusqlite::types::ValueRef::Real(f) => f.to_string(),
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    rusqlite::types::ValueRef::Blob(b) => format!("<{} bytes>", b.len()),
                },
                Err(e) => format!("<{e}>"),
            })
            .collect();
        println!("{}", vals.join("|"));
    }
    Ok(())
}
