//! Service endpoints: `GET /info` (cluster id, spec 2.8), `GET /healthz` and `GET /metrics`
//! (Prometheus text). `/healthz` and `/metrics` need no token.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::blocking;
use crate::server::App;
use crate::server::auth::Caller;
use crate::server::error::ApiResult;
use crate::wire::Info;

pub async fn info(State(app): State<Arc<App>>, caller: Caller) -> ApiResult<Json<Info>> {
    let store = app.store.clone();
    let id = blocking(move || store.cluster_id(&caller.cluster)).await?;
    Ok(Json(Info {
        cluster_id: Some(id),
    }))
}

pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut text = app.metrics.render();
    if let Some(b) = app.store.bucket_metrics() {
        b.render(&mut text);
    }
    if let Some((bytes, pages, dbs)) = app.store.cache_metrics() {
        use std::fmt::Write;
        let _ = writeln!(
            text,
            "# HELP litevfs_cache_bytes Bytes of the data directory's cache (store.db and its log).\n\
             # TYPE litevfs_cache_bytes gauge\nlitevfs_cache_bytes {bytes}\n\
             # HELP litevfs_cache_evicted_pages_total Cached pages evicted to stay under --cache-size.\n\
             # TYPE litevfs_cache_evicted_pages_total counter\nlitevfs_cache_evicted_pages_total {pages}\n\
             # HELP litevfs_cache_evicted_databases_total Databases whose index was evicted to stay under --cache-size.\n\
             # TYPE litevfs_cache_evicted_databases_total counter\nlitevfs_cache_evicted_databases_total {dbs}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
