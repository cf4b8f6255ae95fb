//! Whole-database operations: `GET /db/snapshot`, `POST /db/upload`, `DELETE /db`,
//! `POST /db/restore` (spec 2.3 and 3).
//!
//! Snapshots stream: the store writes pages into a bounded channel from a blocking thread while
//! the response body drains it, so memory stays flat for any database size. A failure after the
//! first byte aborts the response (the client sees a broken transfer, never a short file that
//! looks complete), and so does a client that reads nothing for `--stall-timeout`: the snapshot
//! holds a read transaction, which must not stay open (pinning the store's write-ahead log)
//! for as long as a stalled client keeps its connection. Uploads, restores and deletes are
//! administrative: they ignore leases. An upload is a whole database: `--max-body-size` does
//! not apply to it, only the room the server has to spool it.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{mpsc, oneshot};

use super::{blocking, db_key, parse_txid, spool_body, writable_db_key};
use crate::ltx::{HEADER_SIZE, TRAILER_SIZE, lock_page};
use crate::server::App;
use crate::server::auth::{Caller, Params};
use crate::server::body::Spool;
use crate::server::error::{ApiError, ApiResult};
use crate::server::metrics::Metrics;
use crate::server::store::{Format, RestoreTarget, SnapshotPlan};
use crate::wire::{ErrorCode, HEADER_POS, TxidResponse};

const CHUNK: usize = 256 << 10;

type Chunk = Result<Bytes, std::io::Error>;

/// A `Write` that ships its bytes, in chunks, to the response body.
struct ChannelWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
    app: Arc<App>,
    /// The runtime, to wait for room in the channel with a timeout from the blocking thread.
    rt: tokio::runtime::Handle,
    /// Longest wait for the client to take a chunk.
    stall: Duration,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        Metrics::add(&self.app.metrics.snapshot_bytes_served, chunk.len() as u64);
        match self
            .rt
            .block_on(self.tx.send_timeout(Ok(chunk), self.stall))
        {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "client went away",
            )),
            Err(SendTimeoutError::Timeout(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("client read nothing for {}ms", self.stall.as_millis()),
            )),
        }
    }
}

/// Exact body length of a snapshot.
fn snapshot_len(plan: &SnapshotPlan, format: Format) -> u64 {
    let t = &plan.txn;
    let ps = u64::from(t.page_size);
    match format {
        Format::Sqlite => u64::from(t.commit) * ps,
        Format::Ltx => {
            let pages = u64::from(t.commit) - u64::from(lock_page(t.page_size) <= t.commit);
            (HEADER_SIZE + 4 + TRAILER_SIZE) as u64 + pages * (4 + ps)
        }
    }
}

pub async fn get_snapshot(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
) -> ApiResult<Response> {
    let key = db_key(&caller, &params)?;
    let format: Format = params
        .get("format")
        .unwrap_or("")
        .parse()
        .map_err(|e: String| ApiError::new(ErrorCode::BadFormat, e))?;
    let txid = parse_txid(&params, "txid")?.map(|t| t.0);
    let (ready_tx, ready_rx) = oneshot::channel::<SnapshotPlan>();
    let (data_tx, mut data_rx) = mpsc::channel::<Chunk>(4);
    let (store, app2) = (app.store.clone(), app.clone());
    let (rt, stall) = (tokio::runtime::Handle::current(), app.config.stall_timeout);
    let task = tokio::task::spawn_blocking(move || {
        let err_tx = data_tx.clone();
        let r = store.snapshot(&key, txid, format, |plan| {
            ready_tx.send(plan.clone()).ok()?;
            Some(ChannelWriter {
                tx: data_tx,
                buf: Vec::with_capacity(CHUNK),
                app: app2,
                rt,
                stall,
            })
        });
        if let Err(e) = &r {
            tracing::warn!(db = %key.name, error = %e, "snapshot aborted");
            // Never wait here: the channel may be full because the client stalled. Without the
            // error item the body still ends short of its Content-Length, which aborts it.
            let _ = err_tx.try_send(Err(std::io::Error::other(e.to_string())));
        }
        r
    });
    let Ok(plan) = ready_rx.await else {
        return match task.await {
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(())) => Err(ApiError::internal("snapshot ended before it started")),
            Err(e) => Err(ApiError::internal(e)),
        };
    };
    let stream = futures_util::stream::poll_fn(move |cx| data_rx.poll_recv(cx));
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (
            header::CONTENT_LENGTH,
            HeaderValue::from(snapshot_len(&plan, format)),
        ),
        (
            HEADER_POS.parse().expect("valid header name"),
            HeaderValue::from_str(&plan.txn.pos().to_string()).expect("ascii"),
        ),
    ];
    Ok((headers, Body::from_stream(stream)).into_response())
}

pub async fn post_upload(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<TxidResponse>> {
    let key = writable_db_key(&caller, &params)?;
    // A whole database, of any size: `--max-body-size` is for transactions.
    let limit = crate::server::body::Limit::FreeSpace;
    let spooled = spool_body(&app, &headers, body, limit).await?;
    let store = app.store.clone();
    let pos = blocking(move || match spooled {
        // Local mode, over the memory limit: the received file is kept as it is.
        Spool::Incoming(inc, len) => store.upload_file(&key, len, inc),
        other => {
            let len = other.len();
            store.upload(&key, len, other.into_reader()?)
        }
    })
    .await?;
    Metrics::add(&app.metrics.uploads, 1);
    Ok(Json(TxidResponse { txid: pos.txid }))
}

pub async fn delete_db(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
) -> ApiResult<StatusCode> {
    let key = writable_db_key(&caller, &params)?;
    let store = app.store.clone();
    blocking(move || store.delete_db(&key)).await?;
    Ok(StatusCode::OK)
}

fn restore_target(params: &Params) -> ApiResult<RestoreTarget> {
    let txid = parse_txid(params, "txid")?;
    match (txid, params.get("timestamp")) {
        (Some(t), None) => Ok(RestoreTarget::Txid(t.0)),
        (None, Some(ts)) => {
            let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    ApiError::new(
                        ErrorCode::BadInput,
                        format!("invalid timestamp {ts:?}: {e}"),
                    )
                })?;
            let ms = (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            Ok(RestoreTarget::TimestampMs(ms))
        }
        _ => Err(ApiError::new(
            ErrorCode::BadInput,
            "give exactly one of txid and timestamp",
        )),
    }
}

pub async fn post_restore(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
) -> ApiResult<Json<TxidResponse>> {
    let key = writable_db_key(&caller, &params)?;
    let target = restore_target(&params)?;
    let store = app.store.clone();
    let txid = blocking(move || store.restore(&key, target)).await?;
    Metrics::add(&app.metrics.restores, 1);
    Ok(Json(TxidResponse { txid }))
}
