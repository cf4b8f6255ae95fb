//! The route table, the JSON fallbacks for unknown routes and wrong methods, and the middleware
//! that counts requests (and, for benchmarks only, delays them).
//!
//! Invariant: every path and method gets a JSON reply; a route label in metrics is one of
//! [`ROUTES`] or `unmatched`, and a method label one of [`METHODS`] or `other`, so label
//! cardinality stays bounded whatever clients send.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use tracing::Instrument;

use super::App;
use super::error::ApiError;
use super::handlers::{data, images, lease, misc, sync};
use crate::wire::ErrorCode;

/// Every route the server serves.
pub const ROUTES: &[&str] = &[
    "/pos",
    "/hwm",
    "/db/tx",
    "/db/page",
    "/db/sync",
    "/sync",
    "/lease",
    "/db/snapshot",
    "/db/upload",
    "/db",
    "/db/restore",
    "/info",
    "/healthz",
    "/metrics",
];

/// Method labels of the request metric; any other (extension) method counts as `other`.
pub const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"];

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/pos", get(data::get_pos))
        .route("/hwm", get(data::get_hwm))
        .route("/db/tx", post(data::post_tx))
        .route("/db/page", get(data::get_page))
        .route("/db/sync", get(sync::get_db_sync))
        .route("/sync", post(sync::post_sync))
        .route(
            "/lease",
            post(lease::post_lease).delete(lease::delete_lease),
        )
        .route("/db/snapshot", get(images::get_snapshot))
        .route("/db/upload", post(images::post_upload))
        .route("/db", delete(images::delete_db))
        .route("/db/restore", post(images::post_restore))
        .route("/info", get(misc::info))
        .route("/healthz", get(misc::healthz))
        .route("/metrics", get(misc::metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(
            app.clone(),
            super::body::drain_after_error,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NoRoute,
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "method {} not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !app.config.delay.is_zero() {
        tokio::time::sleep(app.config.delay).await;
    }
    let path = req.uri().path();
    let route = ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("unmatched");
    let method = req.method().clone();
    let method_label = METHODS
        .iter()
        .find(|m| **m == method.as_str())
        .copied()
        .unwrap_or("other");
    let db = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("db="));
    let span = tracing::info_span!("request", %method, route, db = db.unwrap_or(""));
    let started = std::time::Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    app.metrics.request(route, method_label, status);
    let elapsed_ms = started.elapsed().as_millis() as u64;
    span.in_scope(|| tracing::debug!(status, elapsed_ms, "request"));
    resp
}
