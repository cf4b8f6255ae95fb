//! Write leases over HTTP: `POST /lease` (acquire, or refresh with `id`) and `DELETE /lease`
//! (spec 2.7). Acquiring a lease on a database that does not exist creates it at the zero
//! position, as LiteFS Cloud did, so it is listed by `/pos`.
//!
//! Our extension, `hold=MS` on a refresh: the lease is refreshed at once and the reply held for
//! MS. If the client's connection closes meanwhile (its process died and the kernel closed its
//! sockets), the lease is released there and then, so the next writer does not wait out the
//! lease. A shutting-down server releases nothing (with `--store` the lease outlives it).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::{blocking, writable_db_key};
use crate::server::App;
use crate::server::auth::{Caller, Params};
use crate::server::error::{ApiError, ApiResult};
use crate::server::store::{DEFAULT_LEASE, LeaseEvent, StoreResult};
use crate::wire::{ErrorCode, Lease};

fn parse_duration(params: &Params) -> ApiResult<Duration> {
    match params.get("duration") {
        None => Ok(DEFAULT_LEASE),
        Some(s) => s.parse::<u64>().map(Duration::from_millis).map_err(|_| {
            ApiError::new(
                ErrorCode::BadInput,
                format!("invalid duration {s:?} (milliseconds)"),
            )
        }),
    }
}

/// Runs a lease operation off the executor (in bucket mode it reads and writes the bucket).
async fn in_blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(crate::server::store::StoreError::Corrupt(format!(
            "lease task failed: {e}"
        ))),
    }
}

/// Counts the outcome of a lease operation and converts store errors.
fn record<T>(app: &App, ok: LeaseEvent, r: StoreResult<T>) -> ApiResult<T> {
    let event = match &r {
        Ok(_) => Some(ok),
        Err(e) => LeaseEvent::of_error(e),
    };
    if let Some(ev) = event {
        app.metrics.lease_event(ev.as_str());
    }
    r.map_err(ApiError::from)
}

/// Longest `hold` a refresh may ask for.
pub const MAX_HOLD: Duration = Duration::from_secs(30);

fn parse_hold(params: &Params, duration: Duration) -> ApiResult<Option<Duration>> {
    let Some(s) = params.get("hold") else {
        return Ok(None);
    };
    let bad = |why: &str| ApiError::new(ErrorCode::BadInput, format!("invalid hold {s:?}: {why}"));
    let ms: u64 = s.parse().map_err(|_| bad("milliseconds expected"))?;
    let hold = Duration::from_millis(ms);
    if ms == 0 || hold > MAX_HOLD || hold >= duration {
        return Err(bad(&format!(
            "from 1 to {} ms, and shorter than the lease duration",
            MAX_HOLD.as_millis()
        )));
    }
    Ok(Some(hold))
}

/// Releases a held lease when the request holding it is dropped unfinished: the client went away.
struct ReleaseIfGone {
    app: Arc<App>,
    key: Option<crate::server::store::DbKey>,
    id: String,
}

impl Drop for ReleaseIfGone {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        if *self.app.shutdown.borrow() {
            return;
        }
        let (app, id) = (self.app.clone(), std::mem::take(&mut self.id));
        tracing::info!(db = %key.name, "the holder of the write lease disconnected: releasing it");
        tokio::task::spawn_blocking(move || {
            let r = app.store.release_lease(&key, &id);
            if r.is_ok() {
                app.metrics.lease_event("release_on_disconnect");
            }
        });
    }
}

pub async fn post_lease(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
) -> ApiResult<Json<Lease>> {
    let key = writable_db_key(&caller, &params)?;
    let duration = parse_duration(&params)?;
    let store = app.store.clone();
    if let Some(id) = params.get("id") {
        let hold = parse_hold(&params, duration)?;
        let id = id.to_string();
        let (k, i) = (key.clone(), id.clone());
        let r = in_blocking(move || store.refresh_lease(&k, &i, duration)).await;
        let lease = record(&app, LeaseEvent::Refreshed, r)?;
        if let Some(hold) = hold {
            let mut guard = ReleaseIfGone {
                app: app.clone(),
                key: Some(key),
                id,
            };
            let mut shutdown = app.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(hold) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
            guard.key = None;
        }
        return Ok(Json(lease));
    }
    let k = key.clone();
    let r = in_blocking(move || store.acquire_lease(&k, duration)).await;
    let lease = record(&app, LeaseEvent::Acquired, r)?;
    let store = app.store.clone();
    blocking(move || store.ensure_db(&key)).await?;
    Ok(Json(lease))
}

pub async fn delete_lease(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
) -> ApiResult<StatusCode> {
    let key = writable_db_key(&caller, &params)?;
    let id = params
        .get("id")
        .ok_or_else(|| ApiError::new(ErrorCode::BadInput, "missing id parameter"))?;
    let (store, id) = (app.store.clone(), id.to_string());
    let r = in_blocking(move || store.release_lease(&key, &id)).await;
    record(&app, LeaseEvent::Released, r)?;
    Ok(StatusCode::OK)
}
