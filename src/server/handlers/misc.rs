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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
