//! The data plane: `GET /pos`, `GET /hwm`, `POST /db/tx` and `GET /db/page` (spec 2.1, 2.9,
//! 2.2, 2.4).
//!
//! `/db/page` answers in JSON (base64 pages) or, when the client's `Accept` names
//! [`MEDIA_PAGE_FRAMES`], in binary page frames (our extension). Both carry
//! `Litevfs-Page-Size`, `Litevfs-Db-Size` (the database size in pages at the position) and
//! `Litevfs-Page-Checksums` (the stored LTX checksum of every page, so clients can verify pages
//! before caching them).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{
    INLINE_MAX_BODY, blocking, db_key, in_place, inline_or_in_place, parse_pos, spool_body,
    writable_db_key,
};
use crate::server::App;
use crate::server::auth::{Caller, Params};
use crate::server::error::{ApiError, ApiResult};
use crate::server::metrics::Metrics;
use crate::wire::{
    ErrorCode, HEADER_DB_SIZE, HEADER_HWM, HEADER_LEASE_ID, HEADER_PAGE_CHECKSUMS, HEADER_POS,
    MEDIA_PAGE_FRAMES, Page, PagesResponse, Pos, Txid, encode_page_checksums, encode_page_frames,
};

/// Response header of `/db/page`: the page size at the requested position.
pub const HEADER_PAGE_SIZE: &str = "Litevfs-Page-Size";
/// Most distinct page numbers one `/db/page` request may ask for.
pub const MAX_PAGES_PER_REQUEST: usize = 4096;

pub async fn get_pos(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<BTreeMap<String, Pos>>> {
    let store = app.store.clone();
    let cluster = caller.cluster.clone();
    let list = blocking(move || store.positions(&cluster)).await?;
    Ok(Json(list.into_iter().collect()))
}

/// `GET /hwm` (spec 2.9): the high-water mark of every database, i.e. its current TXID, since
/// everything accepted is durable in this store.
pub async fn get_hwm(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> ApiResult<Json<BTreeMap<String, Txid>>> {
    let store = app.store.clone();
    let cluster = caller.cluster.clone();
    let list = blocking(move || store.positions(&cluster)).await?;
    Ok(Json(list.into_iter().map(|(n, p)| (n, p.txid)).collect()))
}

pub async fn post_tx(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let key = writable_db_key(&caller, &params)?;
    let lease = match headers.get(HEADER_LEASE_ID) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::new(ErrorCode::BadInput, "invalid Lfsc-Lease-Id header"))?
                .to_string(),
        ),
        None => None,
    };
    let limit = crate::server::body::Limit::Bytes(app.config.max_body_size);
    let spooled = spool_body(&app, &headers, body, limit).await?;
    let store = app.store.clone();
    let len = spooled.len();
    let apply = move || store.apply_ltx(&key, lease.as_deref(), len, spooled.into_reader()?);
    // A small commit to a local store is a few hundred microseconds of work: applied on this
    // worker when another stays free. A bucket's store waits for object storage: never here.
    let applied = if len <= INLINE_MAX_BODY && app.config.bucket.is_none() {
        inline_or_in_place(&app.inline_commits, apply).await?
    } else {
        in_place(apply).await?
    };
    Metrics::add(&app.metrics.commits, 1);
    Metrics::add(&app.metrics.commit_pages, applied.pages_stored);
    // Everything accepted is durable in this store, so the high-water mark is the new head.
    Ok((StatusCode::OK, [(HEADER_HWM, applied.pos.txid.to_string())]).into_response())
}

/// Page numbers from `pgno` parameters: comma lists and/or repeats, first occurrence kept.
fn parse_pgnos(params: &Params) -> ApiResult<Vec<u32>> {
    let bad = |s: &str| ApiError::new(ErrorCode::InvalidPgno, format!("invalid page number {s:?}"));
    let mut out: Vec<u32> = Vec::new();
    for part in params.all("pgno").flat_map(|v| v.split(',')) {
        let n: u32 = part.trim().parse().map_err(|_| bad(part))?;
        if n == 0 {
            return Err(bad(part));
        }
        if !out.contains(&n) {
            out.push(n);
        }
        if out.len() > MAX_PAGES_PER_REQUEST {
            return Err(ApiError::new(
                ErrorCode::InvalidPgno,
                format!("more than {MAX_PAGES_PER_REQUEST} pages requested"),
            ));
        }
    }
    if out.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidPgno,
            "missing pgno parameter",
        ));
    }
    Ok(out)
}

fn wants_frames(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|m| m.trim().starts_with(MEDIA_PAGE_FRAMES))
        })
}

pub async fn get_page(
    State(app): State<Arc<App>>,
    caller: Caller,
    params: Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let key = db_key(&caller, &params)?;
    // Without `pos` (our extension): the latest position, named in the `Litevfs-Pos` header.
    let pos = params.get("pos").map(parse_pos).transpose()?;
    let pgnos = parse_pgnos(&params)?;
    // Extension: `warm=BYTES` adds the pages every cold reader needs next (local mode).
    let warm = match params.get("warm") {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| {
            ApiError::new(
                ErrorCode::BadInput,
                format!("invalid warm {v:?}: a number of bytes"),
            )
        })?,
    };
    let store = app.store.clone();
    let got = blocking(move || store.pages_at(&key, pos, &pgnos, warm)).await?;
    let bytes: usize = got.pages.iter().map(|(_, d)| d.len()).sum();
    Metrics::add(&app.metrics.pages_served, got.pages.len() as u64);
    Metrics::add(&app.metrics.page_bytes_served, bytes as u64);
    let meta = [
        (
            HEADER_POS,
            HeaderValue::from_str(&got.pos.to_string()).map_err(ApiError::internal)?,
        ),
        (HEADER_PAGE_SIZE, HeaderValue::from(got.page_size)),
        (HEADER_DB_SIZE, HeaderValue::from(got.commit)),
        (
            HEADER_PAGE_CHECKSUMS,
            HeaderValue::from_str(&encode_page_checksums(got.checksums))
                .map_err(ApiError::internal)?,
        ),
    ];
    if wants_frames(&headers) {
        let body = encode_page_frames(got.pages.iter().map(|(p, d)| (*p, d.as_slice())));
        let ct = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(MEDIA_PAGE_FRAMES),
        )];
        return Ok((ct, meta, body).into_response());
    }
    let pages = got
        .pages
        .into_iter()
        .map(|(pgno, data)| Page { pgno, data })
        .collect();
    Ok((meta, Json(PagesResponse { pages })).into_response())
}
