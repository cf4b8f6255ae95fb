//! The one error type every handler returns, and its JSON form on the wire.
//!
//! Owns the mapping from [`ApiError`] to an HTTP response: status from [`ErrorCode::status`],
//! body [`ErrorBody`] (`pos` only with `EPOSMISMATCH`). Every failure a client can see, including
//! unknown routes and wrong methods, goes through here, so no reply is ever plain text.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::store::StoreError;
use crate::ltx::LtxError;
use crate::wire::{ErrorBody, ErrorCode, Pos};

/// An error reply: a code, a human message, and for `EPOSMISMATCH` the current position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub pos: Option<Pos>,
    /// Close the connection after the reply instead of reading the rest of the request body
    /// ([`CloseAfterReply`]).
    pub close: bool,
}

/// Marks a response after which the connection closes and the request body is left unread: a
/// body that stalled, or one refused before `100 Continue` asked the client to send it.
#[derive(Copy, Clone, Debug)]
pub struct CloseAfterReply;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            pos: None,
            close: false,
        }
    }

    /// The same error, replied with `Connection: close` and the request body left unread.
    pub fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }

    /// `EPOSMISMATCH` carrying the server's current position (zero for an unknown database).
    pub fn pos_mismatch(current: Pos) -> ApiError {
        ApiError {
            code: ErrorCode::PosMismatch,
            message: "position mismatch".into(),
            pos: Some(current),
            close: false,
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(ErrorCode::Internal, e.to_string())
    }

    pub fn bad_db(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(ErrorCode::BadDb, format!("invalid database name: {e}"))
    }

    pub fn no_db(name: &str) -> ApiError {
        ApiError::new(ErrorCode::NoDb, format!("database {name:?} not found"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if self.code == ErrorCode::Internal {
            tracing::error!(error = %self.message, "internal error");
        }
        let pos = if self.code == ErrorCode::PosMismatch {
            self.pos
        } else {
            None
        };
        let body = ErrorBody {
            code: self.code.as_str().to_string(),
            error: self.message,
            pos,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if self.close {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            resp.extensions_mut().insert(CloseAfterReply);
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<StoreError> for ApiError {
    /// One exhaustive mapping from store failures to wire codes.
    fn from(e: StoreError) -> ApiError {
        let code = match &e {
            StoreError::PosMismatch(pos) => return ApiError::pos_mismatch(*pos),
            StoreError::NoDb(_) => ErrorCode::NoDb,
            StoreError::NoTxid(_) => ErrorCode::NoTxid,
            StoreError::NoTimestamp(_) => ErrorCode::NoTimestamp,
            StoreError::NoPage(_) => ErrorCode::NoPage,
            StoreError::BadFormat(LtxError::SnapshotChecksum { .. }) => ErrorCode::BadChecksum,
            StoreError::BadFormat(_) => ErrorCode::BadFormat,
            StoreError::BadHeader(_) => ErrorCode::BadHeader,
            StoreError::BadChecksum { .. } => ErrorCode::BadChecksum,
            StoreError::MissingPages { .. } => ErrorCode::MissingPages,
            StoreError::NoPrevPage(_) => ErrorCode::NoPrevPage,
            StoreError::LeaseExists => ErrorCode::LeaseExists,
            StoreError::NoLease => ErrorCode::NoLease,
            StoreError::LeaseMismatch => ErrorCode::LeaseMismatch,
            StoreError::BadInput(_) => ErrorCode::BadInput,
            StoreError::Unavailable(_) | StoreError::Stale(_) => ErrorCode::Unavailable,
            StoreError::CommitUnknown(_) => ErrorCode::CommitUnknown,
            StoreError::Corrupt(_)
            | StoreError::Locked(_)
            | StoreError::Mode(_)
            | StoreError::Unchanged(_)
            | StoreError::Sqlite(_)
            | StoreError::Io(_) => ErrorCode::Internal,
        };
        ApiError::new(code, e.to_string())
    }
}
