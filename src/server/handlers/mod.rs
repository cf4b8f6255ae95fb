//! HTTP handlers, one module per concept: the data plane ([`data`]: `/pos`, `/db/tx`,
//! `/db/page`), change feeds ([`sync`]), leases ([`lease`]), whole-database images
//! ([`images`]: snapshot, upload, delete, restore) and service endpoints ([`misc`]).
//!
//! Handlers only parse and validate input, call the store off the async executor
//! ([`blocking`]; [`in_place`] on the commit path, [`inline_or_in_place`] for a small commit to
//! a local store) and shape replies; every rule about data lives in [`super::store`].

pub mod data;
pub mod images;
pub mod lease;
pub mod misc;
pub mod sync;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::auth::{Caller, Params};
use super::error::{ApiError, ApiResult};
use super::store::{DbKey, StoreResult};
use crate::wire::{ErrorCode, Pos, Txid, validate_db_name};

/// Runs blocking store work on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(format!("store task failed: {e}"))),
    }
}

/// Runs blocking store work on this thread (the worker first hands its other tasks to another
/// thread), or on the blocking pool where the runtime cannot do that (a current-thread
/// runtime). For the commit path: a hand-off to the blocking pool and back costs two thread
/// wake-ups per request. A panic becomes a 500, as with [`blocking`].
pub async fn in_place<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> ApiResult<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() != RuntimeFlavor::MultiThread {
        return blocking(f).await;
    }
    caught(|| tokio::task::block_in_place(f))
}

/// Largest commit body that [`inline_or_in_place`] may apply on the worker thread itself.
pub const INLINE_MAX_BODY: u64 = 64 << 10;

/// Runs the store work of a small commit to a local store directly on this worker thread, as
/// long as another worker of the runtime stays free: at most one worker fewer than the runtime
/// has is ever inside such a call (`inline` counts them), so the runtime always has a worker
/// for everything else. Otherwise (one worker, or the others already busy this way) like
/// [`in_place`].
///
/// Why: [`in_place`]'s hand-off moves the worker's scheduler to another thread for every
/// commit, and the threads that wakes (and the ones it wakes when the request ends) compete
/// with the client for the CPU just when the reply goes out. On the 2-core test machine, store
/// on tmpfs: 1.5 fewer context switches and 30-50 us less server CPU per single-row commit,
/// which is answered about 20 us sooner (median of paired runs; the machine is noisy).
/// The cost: while a commit waits here (for the store's writer, held by a long upload or
/// compaction, say), the runtime runs with one worker fewer; tasks that this worker queued
/// are stolen by the others, except the one in its LIFO slot, which waits for the commit.
pub async fn inline_or_in_place<T: Send + 'static>(
    inline: &AtomicUsize,
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> ApiResult<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let handle = Handle::current();
    if handle.runtime_flavor() == RuntimeFlavor::MultiThread {
        let spare = handle.metrics().num_workers().saturating_sub(1);
        if let Some(_slot) = InlineSlot::take(inline, spare) {
            return caught(f);
        }
    }
    in_place(f).await
}

/// One worker inside [`inline_or_in_place`]; leaves the count on drop, panic or not.
struct InlineSlot<'a>(&'a AtomicUsize);

impl<'a> InlineSlot<'a> {
    fn take(count: &'a AtomicUsize, max: usize) -> Option<InlineSlot<'a>> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InlineSlot(count))
    }
}

impl Drop for InlineSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `f` here; a panic becomes a 500.
fn caught<T>(f: impl FnOnce() -> StoreResult<T>) -> ApiResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(ApiError::from),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(ApiError::internal(format!(
                "store task failed: panicked: {why}"
            )))
        }
    }
}

/// The `db` parameter, validated (spec 1.2), in the caller's cluster.
pub fn db_key(caller: &Caller, params: &Params) -> ApiResult<DbKey> {
    let name = params
        .get("db")
        .ok_or_else(|| ApiError::new(ErrorCode::BadDb, "missing db parameter"))?;
    validate_db_name(name).map_err(ApiError::bad_db)?;
    Ok(DbKey {
        cluster: caller.cluster.clone(),
        name: name.to_string(),
    })
}

/// The database a writing request names, once the caller may write (403 `EFORBIDDEN` for a
/// read-only token).
pub fn writable_db_key(caller: &Caller, params: &Params) -> ApiResult<DbKey> {
    caller.require_write()?;
    db_key(caller, params)
}

/// The request body, spooled within `limit` and the server's stall timeout.
pub async fn spool_body(
    app: &crate::server::App,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: crate::server::body::Limit,
) -> ApiResult<crate::server::body::Spool> {
    // A whole database goes where the store keeps it; a transaction is spooled.
    let to = match limit {
        crate::server::body::Limit::FreeSpace => crate::server::body::SpoolTo::Store(&app.store),
        crate::server::body::Limit::Bytes(_) => {
            crate::server::body::SpoolTo::Tmp(app.store.tmp_dir())
        }
    };
    crate::server::body::spool(headers, body, limit, app.config.stall_timeout, to).await
}

/// A position string `<16 hex>/<16 hex>` (400 `EBADPOS` otherwise).
pub fn parse_pos(s: &str) -> ApiResult<Pos> {
    s.parse::<Pos>()
        .map_err(|e| ApiError::new(ErrorCode::BadPos, format!("invalid pos: {e}")))
}

/// An optional 16-hex-digit TXID parameter (400 `EBADINPUT` if malformed).
pub fn parse_txid(params: &Params, name: &str) -> ApiResult<Option<Txid>> {
    params
        .get(name)
        .map(|s| {
            s.parse::<Txid>()
                .map_err(|e| ApiError::new(ErrorCode::BadInput, format!("invalid {name}: {e}")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;

    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .build()
            .unwrap()
    }

    /// The inline count that a commit spawned on `rt` sees while it runs.
    fn count_inside(rt: &tokio::runtime::Runtime, count: &Arc<AtomicUsize>) -> usize {
        let c = count.clone();
        let task = rt.spawn(async move {
            let seen = c.clone();
            inline_or_in_place(&c, move || Ok(seen.load(Ordering::Acquire))).await
        });
        rt.block_on(task).unwrap().unwrap()
    }

    #[test]
    fn inline_only_while_another_worker_stays_free() {
        let count = Arc::new(AtomicUsize::new(0));
        assert_eq!(count_inside(&runtime(2), &count), 1, "inline");
        assert_eq!(
            count_inside(&runtime(1), &count),
            0,
            "one worker: never inline"
        );
        assert_eq!(count.load(Ordering::Acquire), 0);

        // While one commit waits inline on a 2-worker runtime, the next goes the other way.
        let rt = runtime(2);
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let c = count.clone();
        let first = rt.spawn(async move {
            inline_or_in_place(&c, move || {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            })
            .await
        });
        entered_rx.recv().unwrap();
        assert_eq!(count.load(Ordering::Acquire), 1);
        assert_eq!(
            count_inside(&rt, &count),
            1,
            "the spare worker is not taken too"
        );
        release_tx.send(()).unwrap();
        rt.block_on(first).unwrap().unwrap();
        assert_eq!(count.load(Ordering::Acquire), 0);
    }

    #[test]
    fn an_inline_panic_is_a_500_and_frees_the_slot() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let r = runtime(2)
            .block_on(async move { inline_or_in_place::<()>(&c, || panic!("boom")).await });
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.message.contains("boom"), "{}", e.message);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }
}
