//! Write leases over HTTP: `POST /lease` (acquire, or refresh with `id`) and `DELETE /lease`
//! (spec 2.7). Acquiring a lease on a database that does not exist creates it at the zero
//! position, as LiteFS Cloud did, so it is listed by `/pos`.

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

pub async fn post_lease(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
) -> ApiResult<Json<Lease>> {
    let key = writable_db_key(&caller, &params)?;
    let duration = parse_duration(&params)?;
    let store = app.store.clone();
    if let Some(id) = params.get("id") {
        let id = id.to_string();
        let r = in_blocking(move || store.refresh_lease(&key, &id, duration)).await;
        return record(&app, LeaseEvent::Refreshed, r).map(Json);
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
