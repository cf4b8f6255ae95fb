//! The SQLite-facing side: `sqlite3_vfs` and `sqlite3_io_methods` through sqlite-plugin.
//!
//! Owns [`LitevfsVfs`] and the file handles: the main database file (backed by a
//! [`Database`]), rollback journals (in memory, spilling to an anonymous file in the cache
//! directory past `LITEVFS_TXN_MEMORY`; gone after a crash either way, so a kill -9 never
//! leaves a hot journal to roll onto the cache), the `-wal` and the wal-index of WAL-mode
//! databases (private to the process, see [`super::wal`] and [`super::shm`]), and temporary
//! files (anonymous local files). It detects rollback commits (journal deleted, truncated or its
//! header zeroed; WAL commits are detected in [`super::wal`]) and routes pragmas.
//! Every callback runs inside `catch_unwind`, and every error goes through
//! [`super::report`], which logs it and maps it to an SQLite code; no panic reaches SQLite.

use std::borrow::Cow;
use std::os::unix::fs::FileExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;
use sqlite_plugin::flags::{AccessFlags, LockLevel, OpenKind, OpenOpts, ShmLockMode};
use sqlite_plugin::vars;
use sqlite_plugin::vfs::{Pragma as PluginPragma, PragmaErr, Vfs, VfsHandle, VfsResult};

use super::Litevfs;
use super::database::Database;
use super::error::{Error, Op, Result};
use super::lock::ConnId;
use super::pager::Budget;
use super::pragma::Pragma;
use super::report;
use super::spill::{SpillBuf, SpillConfig};
use crate::wire::validate_db_name;

/// Suffix SQLite appends to the main database name for its rollback journal.
const JOURNAL_SUFFIX: &str = "-journal";
/// Suffix of the write-ahead log.
const WAL_SUFFIX: &str = "-wal";
/// The first bytes of a valid rollback journal header.
const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];

/// The main database file of one connection.
pub struct MainFile {
    db: Arc<Database>,
    conn: ConnId,
    lock: LockLevel,
    budget: Budget,
    readonly: bool,
}

/// A named file that lives in this process only (rollback and super journals, anything else
/// SQLite names): memory, or an anonymous file once large.
pub struct MemFile {
    name: String,
    data: Arc<Mutex<SpillBuf>>,
}

/// The handle SQLite holds for each open file.
pub enum Handle {
    Main(MainFile),
    Mem(MemFile),
    /// The `-wal` of a database: private to this process ([`super::wal`]).
    Wal(Arc<Database>),
    Temp(std::fs::File),
}

impl VfsHandle for Handle {
    fn readonly(&self) -> bool {
        matches!(self, Handle::Main(m) if m.readonly)
    }

    fn in_memory(&self) -> bool {
        false
    }
}

/// The VFS registered as `litevfs`.
pub struct LitevfsVfs {
    pub global: Arc<Litevfs>,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs a callback body in a span naming the database and the operation: catches panics,
/// reports errors, returns SQLite codes.
fn guard<T>(db: Option<&Database>, op: Op, f: impl FnOnce() -> Result<T>) -> VfsResult<T> {
    let _span = tracing::trace_span!("litevfs", db = db.map(|d| d.name.as_str()), ?op).entered();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(report(db, &e, op)),
        Err(p) => Err(report(db, &Error::Panic(panic_message(p)), op)),
    }
}

fn io(e: std::io::Error) -> Error {
    Error::Unsupported(format!("temporary file: {e}"))
}

impl LitevfsVfs {
    fn open_main(&self, name: &str, opts: &OpenOpts) -> Result<Handle> {
        validate_db_name(name).map_err(|e| Error::BadName {
            name: name.into(),
            why: e.to_string(),
        })?;
        let readonly = opts.mode().is_readonly();
        let db = self.global.database(name)?;
        db.attach(readonly)?;
        let conn = self.global.next_conn();
        Ok(Handle::Main(MainFile {
            db,
            conn,
            lock: LockLevel::Unlocked,
            budget: Budget::default(),
            readonly,
        }))
    }

    fn open_mem(&self, name: &str) -> Handle {
        let spill = match self.journal_db(name) {
            Some(db) => db.spill.clone(),
            None => SpillConfig {
                dir: std::env::temp_dir(),
                limit: self.global.config.txn_memory,
            },
        };
        let data = self
            .global
            .journals
            .lock()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(SpillBuf::new(spill))))
            .clone();
        Handle::Mem(MemFile {
            name: name.to_string(),
            data,
        })
    }

    /// The database whose journal `name` is, when it is open in this process.
    fn journal_db(&self, name: &str) -> Option<Arc<Database>> {
        name.strip_suffix(JOURNAL_SUFFIX)
            .and_then(|db| self.global.find(db))
    }

    /// The database whose WAL `name` is, when it is open in this process.
    fn wal_db(&self, name: &str) -> Option<Arc<Database>> {
        name.strip_suffix(WAL_SUFFIX)
            .and_then(|db| self.global.find(db))
    }

    /// SQLite finalised a journal: that is its commit point.
    fn finalized(&self, journal: &str) -> Result<()> {
        let Some(db) = self.journal_db(journal) else {
            return Ok(());
        };
        let r = db.journal_finalized();
        if r.is_err() {
            // No hot journal may roll the failed transaction back onto the cache: the
            // transaction's pages are gone already, the committed state is intact.
            self.global.journals.lock().remove(journal);
        }
        r
    }

    fn mem_write(&self, f: &MemFile, offset: usize, buf: &[u8]) -> Result<usize> {
        let finalize = {
            let mut d = f.data.lock();
            let zeroing = offset == 0 && buf.len() >= 8 && buf.iter().all(|b| *b == 0) && {
                let mut magic = [0u8; 8];
                d.read_at(0, &mut magic)? == 8 && magic == JOURNAL_MAGIC
            };
            d.write_at(offset as u64, buf)?;
            zeroing
        };
        if finalize {
            self.finalized(&f.name)?;
        }
        Ok(buf.len())
    }

    fn mem_truncate(&self, f: &MemFile, size: usize) -> Result<()> {
        f.data.lock().set_len(size as u64)?;
        if size == 0 {
            self.finalized(&f.name)?;
        }
        Ok(())
    }
}

impl Vfs for LitevfsVfs {
    type Handle = Handle;

    fn canonical_path<'a>(&self, path: Cow<'a, str>) -> VfsResult<Cow<'a, str>> {
        guard(None, Op::Open, || {
            validate_db_name(&path).map_err(|e| Error::BadName {
                name: path.to_string(),
                why: e.to_string(),
            })?;
            Ok(path)
        })
    }

    fn open(&self, path: Option<&str>, opts: OpenOpts) -> VfsResult<Handle> {
        guard(None, Op::Open, || match (opts.kind(), path) {
            (OpenKind::MainDb, Some(name)) => self.open_main(name, &opts),
            (OpenKind::MainDb, None) => tempfile::tempfile().map(Handle::Temp).map_err(io),
            (OpenKind::Wal, Some(name)) => match self.wal_db(name) {
                Some(db) => {
                    db.wal_open();
                    Ok(Handle::Wal(db))
                }
                None => Ok(self.open_mem(name)),
            },
            (OpenKind::MainJournal | OpenKind::SuperJournal, Some(name)) => Ok(self.open_mem(name)),
            _ => tempfile::tempfile().map(Handle::Temp).map_err(io),
        })
    }

    fn delete(&self, path: &str) -> VfsResult<()> {
        if let Some(db) = self.wal_db(path) {
            return guard(Some(&db), Op::Commit, || {
                db.wal_delete();
                Ok(())
            });
        }
        let db = self.journal_db(path);
        guard(db.as_deref(), Op::Commit, || {
            let existed = self.global.journals.lock().remove(path).is_some();
            if existed {
                self.finalized(path)
            } else {
                Ok(())
            }
        })
    }

    fn access(&self, path: &str, _flags: AccessFlags) -> VfsResult<bool> {
        if let Some(db) = self.wal_db(path) {
            return Ok(db.wal_exists());
        }
        Ok(self.global.journals.lock().contains_key(path))
    }

    fn file_size(&self, h: &mut Handle) -> VfsResult<usize> {
        match h {
            Handle::Main(m) => guard(Some(&m.db), Op::Read, || {
                m.db.file_size(m.conn).map(|n| n as usize)
            }),
            Handle::Mem(f) => Ok(f.data.lock().len() as usize),
            Handle::Wal(db) => Ok(db.wal_len() as usize),
            Handle::Temp(f) => guard(None, Op::Read, || {
                f.metadata().map(|m| m.len() as usize).map_err(io)
            }),
        }
    }

    fn truncate(&self, h: &mut Handle, size: usize) -> VfsResult<()> {
        match h {
            Handle::Main(m) => guard(Some(&m.db), Op::Write, || {
                m.db.truncate(m.conn, size as u64)
            }),
            Handle::Mem(f) => {
                let db = self.journal_db(&f.name);
                guard(db.as_deref(), Op::Commit, || self.mem_truncate(f, size))
            }
            Handle::Wal(db) => guard(Some(db), Op::Write, || db.wal_truncate(size as u64)),
            Handle::Temp(f) => guard(None, Op::Write, || f.set_len(size as u64).map_err(io)),
        }
    }

    fn write(&self, h: &mut Handle, offset: usize, buf: &[u8]) -> VfsResult<usize> {
        match h {
            Handle::Main(m) => guard(Some(&m.db), Op::Write, || {
                m.db.write(m.conn, offset as u64, buf).map(|_| buf.len())
            }),
            Handle::Mem(f) => {
                let db = self.journal_db(&f.name);
                guard(db.as_deref(), Op::Commit, || self.mem_write(f, offset, buf))
            }
            Handle::Wal(db) => guard(Some(db), Op::Commit, || {
                db.wal_write(offset as u64, buf).map(|_| buf.len())
            }),
            Handle::Temp(f) => guard(None, Op::Write, || {
                f.write_all_at(buf, offset as u64)
                    .map(|_| buf.len())
                    .map_err(io)
            }),
        }
    }

    fn read(&self, h: &mut Handle, offset: usize, buf: &mut [u8]) -> VfsResult<usize> {
        match h {
            Handle::Main(m) => guard(Some(&m.db), Op::Read, || {
                m.db.read(m.conn, &mut m.budget, offset as u64, buf)
            }),
            Handle::Mem(f) => {
                let db = self.journal_db(&f.name);
                guard(db.as_deref(), Op::Read, || {
                    Ok(f.data.lock().read_at(offset as u64, buf)?)
                })
            }
            Handle::Wal(db) => guard(Some(db), Op::Read, || db.wal_read(offset as u64, buf)),
            Handle::Temp(f) => guard(None, Op::Read, || {
                read_at(f, offset as u64, buf).map_err(io)
            }),
        }
    }

    fn lock(&self, h: &mut Handle, level: LockLevel) -> VfsResult<()> {
        let Handle::Main(m) = h else { return Ok(()) };
        if m.lock == LockLevel::Unlocked {
            m.budget = Budget::default();
        }
        let r = guard(Some(&m.db), Op::Lock, || m.db.lock(m.conn, m.lock, level));
        m.lock = r?;
        Ok(())
    }

    fn unlock(&self, h: &mut Handle, level: LockLevel) -> VfsResult<()> {
        let Handle::Main(m) = h else { return Ok(()) };
        if level >= m.lock {
            return Ok(());
        }
        let from = std::mem::replace(&mut m.lock, level);
        guard(Some(&m.db), Op::Commit, || m.db.unlock(m.conn, from, level))
    }

    fn check_reserved_lock(&self, h: &mut Handle) -> VfsResult<bool> {
        match h {
            Handle::Main(m) => guard(Some(&m.db), Op::Lock, || Ok(m.db.reserved())),
            Handle::Mem(_) | Handle::Wal(_) | Handle::Temp(_) => Ok(false),
        }
    }

    fn close(&self, h: Handle) -> VfsResult<()> {
        let Handle::Main(mut m) = h else {
            return Ok(());
        };
        guard(Some(&m.db.clone()), Op::Commit, || {
            m.db.state.lock().shm.unmap(m.conn);
            let from = std::mem::replace(&mut m.lock, LockLevel::Unlocked);
            let r = if from > LockLevel::Unlocked {
                m.db.unlock(m.conn, from, LockLevel::Unlocked)
            } else {
                Ok(())
            };
            m.db.detach();
            r
        })
    }

    fn pragma(
        &self,
        h: &mut Handle,
        pragma: PluginPragma<'_>,
    ) -> Result<Option<String>, PragmaErr> {
        let Handle::Main(m) = h else {
            return Err(PragmaErr::NotFound);
        };
        let db = &m.db;
        let r = catch_unwind(AssertUnwindSafe(|| {
            match Pragma::parse(pragma.name, pragma.arg)? {
                Some(p) => p.eval(db).map(Some),
                None => Ok(None),
            }
        }));
        let r = r.unwrap_or_else(|p| Err(Error::Panic(panic_message(p))));
        match r {
            Ok(Some(out)) => Ok(out),
            Ok(None) => Err(PragmaErr::NotFound),
            Err(e) => {
                let code = report(Some(db), &e, Op::Pragma);
                Err(PragmaErr::Fail(code, Some(format!("litevfs: {e}"))))
            }
        }
    }

    fn shm_map(
        &self,
        h: &mut Handle,
        region: usize,
        size: usize,
        extend: bool,
    ) -> VfsResult<Option<NonNull<u8>>> {
        let Handle::Main(m) = h else {
            return Err(vars::SQLITE_IOERR_SHMMAP);
        };
        guard(Some(&m.db), Op::Lock, || {
            Ok(m.db.state.lock().shm.map(m.conn, region, size, extend))
        })
    }

    fn shm_lock(&self, h: &mut Handle, offset: u32, n: u32, mode: ShmLockMode) -> VfsResult<()> {
        let Handle::Main(m) = h else {
            return Err(vars::SQLITE_IOERR_SHMLOCK);
        };
        let (lock, exclusive) = match mode {
            ShmLockMode::LockShared => (true, false),
            ShmLockMode::LockExclusive => (true, true),
            ShmLockMode::UnlockShared => (false, false),
            ShmLockMode::UnlockExclusive => (false, true),
        };
        if lock && !exclusive && offset as usize >= super::shm::READ0 {
            // A WAL read transaction starts (the file lock stays SHARED between them).
            m.budget = Budget::default();
        }
        guard(Some(&m.db), Op::Lock, || {
            m.db.shm_lock(m.conn, offset, n, lock, exclusive)
        })
    }

    fn shm_barrier(&self, _h: &mut Handle) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn shm_unmap(&self, h: &mut Handle, _delete: bool) -> VfsResult<()> {
        if let Handle::Main(m) = h {
            m.db.state.lock().shm.unmap(m.conn);
        }
        Ok(())
    }

    fn device_characteristics(&self, _h: &mut Handle) -> VfsResult<i32> {
        Ok(vars::SQLITE_IOCAP_POWERSAFE_OVERWRITE
            | vars::SQLITE_IOCAP_SAFE_APPEND
            | vars::SQLITE_IOCAP_SEQUENTIAL)
    }
}

fn read_at(f: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}
