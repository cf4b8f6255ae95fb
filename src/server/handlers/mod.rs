//! HTTP handlers, one module per concept: the data plane ([`data`]: `/pos`, `/db/tx`,
//! `/db/page`), change feeds ([`sync`]), leases ([`lease`]), whole-database images
//! ([`images`]: snapshot, upload, delete, restore) and service endpoints ([`misc`]).
//!
//! Handlers only parse and validate input, call the store off the async executor
//! ([`blocking`]; [`in_place`] on the commit path) and shape replies; every rule about data lives in [`super::store`].

pub mod data;
pub mod images;
pub mod lease;
pub mod misc;
pub mod sync;

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
    let run = std::panic::AssertUnwindSafe(|| tokio::task::block_in_place(f));
    match std::panic::catch_unwind(run) {
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
