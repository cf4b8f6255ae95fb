//! Request bodies: reading them under the size limit, spooling large ones to disk.
//!
//! Invariant: no body larger than its limit is ever accepted (413 `ETOOLARGE`): `--max-body-size`
//! for transactions, the free space of `DATA_DIR/tmp` for whole-database uploads ([`Limit`]), and
//! no body larger than [`MEMORY_LIMIT`] is held in memory: it goes to an anonymous temporary file
//! in `DATA_DIR/tmp` that disappears when dropped. Bodies are read completely before the store
//! sees them, so a slow client never holds the store's writer; a body that makes no progress
//! for `--stall-timeout` is refused (400 `EBADINPUT`, once that timeout has passed, and the
//! connection closed), so a stalled client holds nothing forever. A `Content-Length` over the
//! limit with `Expect: 100-continue` is refused at once, before the client is asked to send.
//! Any other error reply goes out at once, and the unread rest of the body is drained (bounded)
//! after it, so the client sees the error rather than a reset connection: at once if it reads
//! while it sends, once it has sent the body otherwise. (A request with both `Content-Length` and
//! `Transfer-Encoding` never gets here with both: hyper reads it by `Transfer-Encoding` alone and
//! closes the connection after the reply, as RFC 9112 section 6.3 requires, so nothing can be
//! smuggled behind it.)

use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use futures_util::StreamExt;

use super::error::{ApiError, ApiResult, CloseAfterReply};
use crate::wire::ErrorCode;

/// Bodies up to this size stay in memory.
pub const MEMORY_LIMIT: usize = 8 << 20;

/// A fully received body.
pub enum Spool {
    Memory(Vec<u8>),
    File(std::fs::File, u64),
    /// Received into a file the store keeps as it is ([`SpoolTo::Store`]).
    Incoming(crate::server::store::Incoming, u64),
}

/// Where a body over [`MEMORY_LIMIT`] goes.
#[derive(Copy, Clone)]
pub enum SpoolTo<'a> {
    /// An anonymous temporary file in this directory.
    Tmp(&'a Path),
    /// A whole-database upload: the file the store keeps its pages in, where it has one
    /// ([`crate::server::store::Store::incoming`]), else its temporary directory.
    Store(&'a crate::server::store::Store),
}

impl Spool {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> u64 {
        match self {
            Spool::Memory(v) => v.len() as u64,
            Spool::File(_, n) | Spool::Incoming(_, n) => *n,
        }
    }

    /// A reader over the body from its start.
    pub fn into_reader(self) -> std::io::Result<Box<dyn Read + Send>> {
        match self {
            Spool::Memory(v) => Ok(Box::new(Cursor::new(v))),
            Spool::File(mut f, _) => {
                f.seek(SeekFrom::Start(0))?;
                Ok(Box::new(f))
            }
            Spool::Incoming(mut inc, _) => {
                inc.rewind()?;
                Ok(Box::new(inc))
            }
        }
    }
}

/// How large a spooled body may be.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Limit {
    /// At most this many bytes (`--max-body-size`).
    Bytes(u64),
    /// As large as the file system of the spool directory has room for: a whole-database
    /// upload, which no configured size refuses.
    FreeSpace,
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        ErrorCode::TooLarge,
        format!("request body exceeds the limit of {limit} bytes"),
    )
}

fn no_room(len: u64, free: u64) -> ApiError {
    ApiError::new(
        ErrorCode::TooLarge,
        format!(
            "the server has no room for a body of {len} bytes: its data directory has {free} \
             bytes free"
        ),
    )
}

/// A failed write to the spool: a full disk is the client's 413, anything else the server's.
fn spool_write_error(e: std::io::Error) -> ApiError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        ApiError::new(
            ErrorCode::TooLarge,
            "the server ran out of disk space while receiving the body",
        )
    } else {
        ApiError::internal(format!("spooling the request body: {e}"))
    }
}

/// Bytes available to an unprivileged writer on the file system of `dir`.
fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is a NUL-terminated string and `st` a properly sized, writable struct for
    // the duration of the call; statvfs writes nothing else.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Most bytes of a refused body read and discarded after the error reply, so that ordinary
/// clients (which send the whole body before reading the reply) see the error instead of a
/// reset connection. Past this the connection is simply closed.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads and discards `stream`, at most [`DRAIN_LIMIT`] bytes, giving up after `stall` without
/// progress.
async fn drain<S>(mut stream: S, stall: Duration)
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin,
{
    let mut drained = 0u64;
    while drained < DRAIN_LIMIT {
        match tokio::time::timeout(stall, stream.next()).await {
            Ok(Some(Ok(chunk))) => drained += chunk.len() as u64,
            _ => break,
        }
    }
}

/// A request body shared between the handler and [`drain_after_error`], so that what a handler
/// (or an extractor that refused the request) left unread can still be read afterwards.
struct SharedBody(Arc<Mutex<Option<Body>>>);

impl hyper::body::Body for SharedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

/// Middleware: sends an error reply to a request with a body at once, and then reads what is
/// left of the body (bounded by [`DRAIN_LIMIT`] and the stall timeout) before the connection
/// may close. A server that answers early and closes a connection with unread data makes the
/// kernel reset it, and a client still sending then sees "connection reset" instead of the
/// error (a 401 or 403 on an upload, say). A client that reads while it sends has the reply
/// long before the drain ends, whatever the size of its body; one that reads only after
/// sending gets it for bodies up to the limit.
pub async fn drain_after_error(
    axum::extract::State(app): axum::extract::State<Arc<crate::server::App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    if hyper::body::Body::is_end_stream(&body) {
        return next
            .run(axum::extract::Request::from_parts(parts, body))
            .await;
    }
    let shared = Arc::new(Mutex::new(Some(body)));
    let req = axum::extract::Request::from_parts(parts, Body::new(SharedBody(shared.clone())));
    let resp = next.run(req).await;
    let failed = resp.status().is_client_error() || resp.status().is_server_error();
    if failed && resp.extensions().get::<CloseAfterReply>().is_none() {
        let rest = shared.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rest) = rest {
            // The connection keeps reading the body for as long as this holds it.
            tokio::spawn(drain(rest.into_data_stream(), app.config.stall_timeout));
        }
    }
    resp
}

/// The next chunk of `stream`: `None` at the end, 400 `EBADINPUT` if it fails or if nothing
/// arrives for `stall`.
async fn next_chunk<S>(stream: &mut S, stall: Duration) -> ApiResult<Option<axum::body::Bytes>>
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin,
{
    match tokio::time::timeout(stall, stream.next()).await {
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(e))) => Err(ApiError::new(
            ErrorCode::BadInput,
            format!("reading request body: {e}"),
        )),
        Ok(None) => Ok(None),
        Err(_) => Err(ApiError::new(
            ErrorCode::BadInput,
            format!("request body stalled: no data for {}ms", stall.as_millis()),
        )
        .closing()),
    }
}

/// `err` (a 413) for a declared length over the limit. A client waiting for `100 Continue` has
/// sent nothing, so the connection closes after the reply; otherwise [`drain_after_error`]
/// reads what it sends after the reply.
fn refuse_declared(headers: &HeaderMap, err: ApiError) -> ApiError {
    let expects = headers
        .get(axum::http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects { err.closing() } else { err }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads `body` (within `limit`, no byte more than `stall` after the previous), spilling to a
/// file (`to`) past [`MEMORY_LIMIT`].
pub async fn spool(
    headers: &HeaderMap,
    body: Body,
    limit: Limit,
    stall: Duration,
    to: SpoolTo<'_>,
) -> ApiResult<Spool> {
    let tmp_dir = match to {
        SpoolTo::Tmp(dir) => dir,
        SpoolTo::Store(store) => store.tmp_dir(),
    };
    let mut stream = body.into_data_stream();
    let declared = content_length(headers);
    let limit = match limit {
        Limit::Bytes(limit) => {
            if declared.is_some_and(|n| n > limit) {
                return Err(refuse_declared(headers, too_large(limit)));
            }
            limit
        }
        Limit::FreeSpace => {
            if let Some(n) = declared.filter(|&n| n > MEMORY_LIMIT as u64) {
                let free = free_space(tmp_dir).map_err(ApiError::internal)?;
                if n > free {
                    return Err(refuse_declared(headers, no_room(n, free)));
                }
            }
            u64::MAX
        }
    };
    let mut mem = Vec::new();
    let mut file: Option<(std::fs::File, u64)> = None;
    let mut incoming = None;
    while let Some(chunk) = next_chunk(&mut stream, stall).await? {
        let total = file.as_ref().map_or(mem.len() as u64, |f| f.1) + chunk.len() as u64;
        if total > limit {
            return Err(too_large(limit));
        }
        if file.is_none() && total as usize > MEMORY_LIMIT {
            let mut f = match to {
                SpoolTo::Store(store) => match store.incoming() {
                    Some(inc) => {
                        let inc = inc.map_err(ApiError::internal)?;
                        let f = inc.file().try_clone().map_err(ApiError::internal)?;
                        incoming = Some(inc);
                        f
                    }
                    None => tempfile::tempfile_in(tmp_dir).map_err(ApiError::internal)?,
                },
                SpoolTo::Tmp(_) => tempfile::tempfile_in(tmp_dir).map_err(ApiError::internal)?,
            };
            f.write_all(&mem).map_err(spool_write_error)?;
            file = Some((f, mem.len() as u64));
            mem = Vec::new();
        }
        match file.as_mut() {
            Some((f, n)) => {
                // Small synchronous writes into the page cache; the store syncs a file it
                // keeps, a temporary one is never synced.
                *n += chunk.len() as u64;
                // Starting the write-back may wait for the disk's queue: off the executor too.
                tokio::task::block_in_place(|| {
                    f.write_all(&chunk)?;
                    if let Some(inc) = incoming.as_mut() {
                        inc.received(*n);
                    }
                    Ok(())
                })
                .map_err(spool_write_error)?;
            }
            None => mem.extend_from_slice(&chunk),
        }
    }
    Ok(match (file, incoming) {
        (Some((_, n)), Some(inc)) => Spool::Incoming(inc, n),
        (Some((f, n)), None) => Spool::File(f, n),
        (None, _) => Spool::Memory(mem),
    })
}

/// Reads a small body (JSON) completely, at most `limit` bytes, stalling at most `stall`.
pub async fn read_small(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    stall: Duration,
) -> ApiResult<Vec<u8>> {
    let mut stream = body.into_data_stream();
    if content_length(headers).is_some_and(|n| n > limit) {
        return Err(refuse_declared(headers, too_large(limit)));
    }
    let mut out = Vec::new();
    while let Some(chunk) = next_chunk(&mut stream, stall).await? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_large(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
