//! Change feeds: `GET /db/sync` and `POST /sync` (spec 2.5, 2.6), with our long-poll extension.
//!
//! Long-poll: with `?wait=MS` (capped at [`MAX_SYNC_WAIT_MS`]) the reply is held until any
//! requested database moves away from the position the client sent (a commit, upload, restore,
//! creation or deletion), or until the wait ends, when the plain "no changes" reply is sent.
//! Without `wait` the reply is immediate. The store is re-read after every change notification,
//! so a reply never reports a position older than the one that woke it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use tokio::time::Instant;

use super::{blocking, db_key, parse_pos};
use crate::server::App;
use crate::server::auth::{Caller, Params};
use crate::server::body::read_small;
use crate::server::error::{ApiError, ApiResult};
use crate::server::store::{DbKey, Store, StoreResult};
use crate::wire::{
    Changes, ErrorCode, MAX_SYNC_WAIT_MS, Pos, SyncRequest, SyncResponse, validate_db_name,
};

/// Largest `POST /sync` body.
const MAX_SYNC_BODY: u64 = 16 << 20;
/// Most databases one `POST /sync` may ask about.
pub const MAX_SYNC_DATABASES: usize = 10_000;

fn parse_wait(params: &Params) -> ApiResult<Option<Duration>> {
    let Some(s) = params.get("wait") else {
        return Ok(None);
    };
    let ms: u64 = s.parse().map_err(|_| {
        ApiError::new(
            ErrorCode::BadInput,
            format!("invalid wait {s:?} (milliseconds)"),
        )
    })?;
    Ok(Some(Duration::from_millis(ms.min(MAX_SYNC_WAIT_MS))))
}

/// Evaluates `read` until `moved` says so, the wait ends, or the server shuts down.
async fn long_poll<T: Send + 'static>(
    app: &Arc<App>,
    keys: Vec<DbKey>,
    wait: Option<Duration>,
    read: impl Fn(&Store) -> StoreResult<T> + Clone + Send + 'static,
    moved: impl Fn(&T) -> bool,
) -> ApiResult<T> {
    let deadline = Instant::now() + wait.unwrap_or_default();
    // Bucket mode: while a reader waits, the poller looks for other servers' commits.
    let _watching = wait.and_then(|_| app.store.watch(keys));
    let mut changes = app.store.subscribe();
    let mut shutdown = app.shutdown.clone();
    loop {
        changes.borrow_and_update();
        let store = app.store.clone();
        let f = read.clone();
        let out = blocking(move || f(&store)).await?;
        if wait.is_none() || moved(&out) || Instant::now() >= deadline || *shutdown.borrow() {
            return Ok(out);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = changes.changed() => {}
            _ = shutdown.changed() => {}
        }
    }
}

pub async fn get_db_sync(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
) -> ApiResult<Json<Changes>> {
    let key = db_key(&caller, &params)?;
    let client = params
        .get("pos")
        .map(parse_pos)
        .transpose()?
        .unwrap_or(Pos::ZERO);
    let wait = parse_wait(&params)?;
    let name = key.name.clone();
    let keys = vec![key.clone()];
    let read = move |s: &Store| s.changes(&key, client);
    let moved = |c: &Option<Changes>| c.as_ref().is_none_or(|c| c.pos != client || c.drops_all());
    match long_poll(&app, keys, wait, read, moved).await? {
        Some(c) => Ok(Json(c)),
        None => Err(ApiError::no_db(&name)),
    }
}

pub async fn post_sync(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<SyncResponse>> {
    let wait = parse_wait(&params)?;
    let limit = MAX_SYNC_BODY.min(app.config.max_body_size);
    let bytes = read_small(&headers, body, limit, app.config.stall_timeout).await?;
    let req: SyncRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorCode::BadInput, format!("invalid sync request: {e}")))?;
    if req.positions.len() > MAX_SYNC_DATABASES {
        return Err(ApiError::new(
            ErrorCode::BadInput,
            format!(
                "{} databases in one sync request; at most {MAX_SYNC_DATABASES}",
                req.positions.len()
            ),
        ));
    }
    for name in req.positions.keys() {
        validate_db_name(name).map_err(ApiError::bad_db)?;
    }
    let positions: Vec<(String, Pos)> = req.positions.into_iter().collect();
    let requested: BTreeMap<String, Pos> = positions.iter().cloned().collect();
    let cluster = caller.cluster.clone();
    let keys = positions
        .iter()
        .map(|(name, _)| DbKey {
            cluster: cluster.clone(),
            name: name.clone(),
        })
        .collect();
    let read = move |s: &Store| s.changes_many(&cluster, &positions);
    let moved = |got: &Vec<(String, Changes)>| {
        let found: BTreeMap<&str, &Changes> = got.iter().map(|(n, c)| (n.as_str(), c)).collect();
        requested
            .iter()
            .any(|(name, pos)| match found.get(name.as_str()) {
                Some(c) => c.pos != *pos || c.drops_all(),
                None => !pos.is_zero(),
            })
    };
    let got = long_poll(&app, keys, wait, read, moved).await?;
    Ok(Json(SyncResponse {
        changes: got.into_iter().collect(),
    }))
}
