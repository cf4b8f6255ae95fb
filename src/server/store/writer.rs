//! The writer connection, and the SQLite commit of logged transactions after their replies.
//!
//! A small transaction is durable once its record is in the commit log ([`super::commitlog`]).
//! The `COMMIT` that then makes it visible in `store.db` does not sync, but it writes every
//! store page the transaction touched (a few whole 32 KiB pages: the new page versions, three
//! index leaves, the position) and was the larger half of the store's time per transaction. So
//! it does not delay the reply: the SQLite transaction stays open, as a batch that the next
//! logged transactions join, and is committed by a thread of its own ([`Finisher`]) at most
//! [`BATCH_WINDOW`] after the batch's first transaction, or at once by anyone who needs
//! `store.db` as acknowledged. A stream of small commits then writes each hot page once per
//! batch instead of once per transaction.
//!
//! Invariants:
//! - a batch holds only transactions whose records are durable in the log, all acknowledged
//!   (or about to be: the reply is on its way); at most one batch is open, for at most
//!   [`BATCH_WINDOW`] (and [`MAX_BATCH`] transactions) while nobody asks for `store.db`;
//! - whoever takes the writer for anything else ([`Writer::lock`]) commits the batch first, so
//!   every other write starts from it; every read of `store.db` through the store
//!   ([`Writer::settle`] before its snapshot), and a backup (it takes SQLite's write lock, which
//!   an open batch holds), sees every transaction whose reply was sent: a request that comes
//!   after a reply finds the batch open and commits it before reading;
//! - watchers of changes are told when a transaction is acknowledged ([`Writer::defer`]), not
//!   when its batch commits: what they read next commits it, so a batch never delays a reader;
//! - a transaction that fails after it joined a batch rolls the whole batch back; the batch's
//!   transactions are then applied again from their records ([`Writer::reapply`], the code of
//!   recovery), before the failure is reported;
//! - a batch `COMMIT` (or a reapplication) that fails stops the process: its transactions were
//!   acknowledged, their records are in the log, and the next start applies them (as after a
//!   crash). Continuing would show readers a position older than one already acknowledged.
//!
//! It does not decide what is logged: [`super::apply`] does.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::watch;

use super::checkpoint::Checkpointer;
use super::{Fetch, StoreResult, commitlog, synchronous};

/// Longest a batch stays open while nobody reads: the staleness of `store.db` (never of what
/// readers see) and the most a crash of the server adds to the work of the next start.
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Most transactions in one batch.
pub const MAX_BATCH: u32 = 64;

/// The writer connection, and how many logged transactions are open on it.
pub struct Conn {
    conn: Connection,
    batch: u32,
}

impl Deref for Conn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// The writer connection and what follows each of its commits.
pub struct Writer {
    conn: Mutex<Conn>,
    /// A batch is open (set and cleared under `conn`'s lock; read without it).
    pending: AtomicBool,
    /// When the open batch began, in microseconds since `epoch`.
    since: AtomicU64,
    epoch: Instant,
    changes: watch::Sender<u64>,
    pub(super) checkpointer: Checkpointer,
    /// Tests: the finisher thread leaves batches open.
    #[cfg(test)]
    pub(super) hold: AtomicBool,
}

impl Writer {
    pub fn new(conn: Connection, checkpointer: Checkpointer) -> Writer {
        Writer {
            conn: Mutex::new(Conn { conn, batch: 0 }),
            pending: AtomicBool::new(false),
            since: AtomicU64::new(0),
            epoch: Instant::now(),
            changes: watch::channel(0).0,
            checkpointer,
            #[cfg(test)]
            hold: AtomicBool::new(false),
        }
    }

    /// The writer connection, with no batch open on it.
    pub fn lock(&self) -> MutexGuard<'_, Conn> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        self.finish(&mut conn);
        conn
    }

    /// The writer connection for a logged transaction: the open batch stays open for it to
    /// join, unless it is full.
    pub fn lock_batch(&self) -> MutexGuard<'_, Conn> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.batch >= MAX_BATCH {
            self.finish(&mut conn);
        }
        conn
    }

    /// Commits the open batch, if any.
    pub fn finish(&self, conn: &mut Conn) {
        if conn.batch == 0 {
            return;
        }
        if let Err(e) = conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.raw_execute())
        {
            stop(&format!(
                "the commit of acknowledged transactions failed ({e})"
            ));
        }
        conn.batch = 0;
        self.pending.store(false, Ordering::Release);
        self.checkpointer.kick();
    }

    /// Commits the open batch, if any: call before reading `store.db`.
    pub fn settle(&self) {
        if self.pending.load(Ordering::Acquire) {
            drop(self.lock());
        }
    }

    /// Opens a batch for a logged transaction, unless `conn` has one to join.
    pub fn begin(&self, conn: &mut Conn) -> rusqlite::Result<()> {
        if conn.batch == 0 {
            synchronous(conn, false)?;
            conn.prepare_cached("BEGIN IMMEDIATE")?.raw_execute()?;
        }
        Ok(())
    }

    /// The transaction just written on `conn` (its record durable in the log) joins the batch,
    /// to be committed after the reply.
    pub fn defer(&self, mut conn: MutexGuard<'_, Conn>, finisher: &Finisher) {
        debug_assert!(!conn.is_autocommit(), "defer without an open transaction");
        if conn.batch == 0 {
            let now = self.epoch.elapsed().as_micros() as u64;
            self.since.store(now, Ordering::Relaxed);
            self.pending.store(true, Ordering::Release);
        }
        conn.batch += 1;
        drop(conn);
        self.notify();
        finisher.kick();
    }

    /// A logged transaction failed after it began on `conn`: rolls back what it wrote, with the
    /// batch it joined, then applies the batch's transactions again from the log (they are
    /// acknowledged) and commits them.
    pub fn reapply(&self, conn: &mut Conn, data_dir: &Path, fetch: &dyn Fetch) {
        let joined = conn.batch;
        if let Err(e) = conn
            .prepare_cached("ROLLBACK")
            .and_then(|mut s| s.raw_execute())
            && !conn.is_autocommit()
        {
            stop(&format!(
                "a failed transaction could not be rolled back ({e})"
            ));
        }
        conn.batch = 0;
        self.pending.store(false, Ordering::Release);
        if joined == 0 {
            return;
        }
        let again = (|| -> StoreResult<u64> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (_, applied) = commitlog::apply_records(data_dir, &tx, fetch)?;
            tx.commit()?;
            Ok(applied)
        })();
        match again {
            Ok(n) if n == u64::from(joined) => self.checkpointer.kick(),
            Ok(n) => stop(&format!(
                "{n} transactions applied again from the commit log after a rollback, {joined} \
                 expected"
            )),
            Err(e) => stop(&format!(
                "acknowledged transactions could not be applied again from the commit log ({e})"
            )),
        }
    }

    /// After a transaction committed on its own: tells watchers, and the checkpoint thread if
    /// one is due.
    pub fn committed(&self) {
        self.notify();
        self.checkpointer.kick();
    }

    /// Tells watchers that something changed.
    pub fn notify(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// When the open batch is due to commit (`None`: no batch is open).
    fn due(&self) -> Option<Instant> {
        self.pending.load(Ordering::Acquire).then(|| {
            self.epoch + Duration::from_micros(self.since.load(Ordering::Relaxed)) + BATCH_WINDOW
        })
    }

    #[cfg(test)]
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }
}

/// Stops the process: acknowledged transactions could not be made visible in `store.db`; the
/// next start applies them from the commit log.
fn stop(what: &str) -> ! {
    tracing::error!("{what}: stopping, so that the next start applies them from the commit log");
    std::process::abort();
}

/// The thread committing batches; on drop it commits the open one and stops.
pub struct Finisher {
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Finisher {
    pub fn start(w: Arc<Writer>) -> std::io::Result<Finisher> {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("litevfs-commit".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // The batch open now may be a later one than the kick's (someone committed
                    // that one): wait for whichever is open to come due.
                    while let Some(due) = w.due() {
                        let now = Instant::now();
                        if now < due {
                            std::thread::sleep(due - now);
                            continue;
                        }
                        #[cfg(test)]
                        if w.hold.load(Ordering::Relaxed) {
                            break;
                        }
                        w.settle();
                    }
                }
                w.settle();
            })?;
        Ok(Finisher {
            kick: Some(tx),
            thread: Some(thread),
        })
    }

    /// Wakes the thread (never blocks: a wake-up already pending covers this one).
    pub fn kick(&self) {
        if let Some(tx) = &self.kick {
            let _ = tx.try_send(());
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        self.kick = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
