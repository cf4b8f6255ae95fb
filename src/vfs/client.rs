//! Blocking HTTP client of the page-store API (spec sections 1, 2, 5.2 and 6).
//!
//! Owns the one `reqwest` client of the process (keep-alive pool, a timeout on every request),
//! the authentication and routing headers, and the translation of HTTP failures into
//! [`ClientError`]s whose messages name the host, and `LITEFS_CLOUD_TOKEN` on a 401. It keeps
//! no database state and never retries: callers decide. Commits to a plain `http://` store go
//! through [`Http1`] on the caller's thread instead (same timeouts, same errors).

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};

use super::config::Config;
use super::http1::Http1;
use super::spill::SpillBuf;
use crate::wire::{
    self, Changes, ErrorBody, ErrorCode, HEADER_CLUSTER_ID, HEADER_LEASE_ID, Lease,
    MEDIA_PAGE_FRAMES, Page, PagesResponse, Pos, SyncRequest, SyncResponse,
};

/// Timeout of every ordinary request (connect, send, receive).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The slowest transfer and apply rate a commit's timeout allows for, in bytes per millisecond
/// (4 MB/s): a 1 GiB commit may take 15 s + 268 s.
const SLOWEST_COMMIT_BYTES_PER_MS: u64 = 4_000;
/// Timeout to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request to the page store failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the page store at {host} (LITEFS_CLOUD_HOST): {detail}")]
    Unreachable { host: String, detail: String },
    #[error(
        "the page store at {host} refused the credentials: check LITEFS_CLOUD_TOKEN \
         (and LITEFS_CLOUD_CLUSTER): {status} {code}: {message}"
    )]
    Unauthorized {
        host: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("the page store at {host} is at position {pos}, not at ours")]
    PosMismatch { host: String, pos: Pos },
    #[error("the page store at {host} answered {status} {code}: {message}")]
    Api {
        host: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected reply from the page store at {host}: {detail}")]
    BadResponse { host: String, detail: String },
}

impl ClientError {
    /// The wire error code, when the store sent one.
    pub fn api_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } | ClientError::Unauthorized { code, .. } => {
                ErrorCode::from_code(code)
            }
            ClientError::PosMismatch { .. } => Some(ErrorCode::PosMismatch),
            ClientError::Unreachable { .. } | ClientError::BadResponse { .. } => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// A `GET /db/page` reply.
#[derive(Debug)]
pub struct Fetched {
    pub pages: Vec<Page>,
    /// Per-page checksums, when the store sends them.
    pub checksums: Option<PageChecksums>,
    /// The position the pages are from, when the store names it.
    pub pos: Option<Pos>,
    /// The database size in pages at that position, when the store sends it.
    pub size: Option<u32>,
}

/// Page checksums the store sent with a `GET /db/page` reply, by page number.
pub type PageChecksums = BTreeMap<u32, wire::Checksum>;

/// The page-store client; one per process, shared by every database.
pub struct Client {
    http: Http,
    host: String,
    token: Option<String>,
    cluster: Option<String>,
    cluster_id: String,
    commit_deadline: Duration,
    /// The direct path for commits, when the store is plain `http://` without a proxy, and
    /// the URL of `/db/tx` on it (parsed once: a parse costs more than the rest of the head).
    http1: Option<(Http1, reqwest::Url)>,
}

const USER_AGENT: &str = concat!("litevfs/", env!("CARGO_PKG_VERSION"));

/// Whether `v` can go into a request head as it is (no control characters, so no CR or LF).
fn header_safe(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

impl Client {
    pub fn new(config: &Config) -> Result<Client> {
        let http = Http::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| ClientError::Unreachable {
                host: config.host.clone(),
                detail: e.to_string(),
            })?;
        let cluster_id = format!("LFSC{:016X}", rand::random::<u64>());
        let http1 = reqwest::Url::parse(&config.host)
            .ok()
            .filter(|_| config.token.as_deref().is_none_or(header_safe))
            .and_then(|base| Http1::for_url(&base, USER_AGENT))
            .and_then(|h| {
                let tx = reqwest::Url::parse(&format!("{}/db/tx", config.host)).ok()?;
                Some((h, tx))
            });
        Ok(Client {
            http1,
            http,
            host: config.host.clone(),
            token: config.token.clone(),
            cluster: config.cluster.clone(),
            cluster_id,
            commit_deadline: config.commit_deadline,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// How long a commit whose reply was lost is pursued (`LITEVFS_COMMIT_DEADLINE`).
    pub fn commit_deadline(&self) -> Duration {
        self.commit_deadline
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
    ) -> RequestBuilder {
        let mut q: Vec<(&str, String)> = query.to_vec();
        if let Some(c) = &self.cluster {
            q.push(("cluster", c.clone()));
        }
        let mut rb = self
            .http
            .request(method, format!("{}{}", self.host, path))
            .query(&q);
        if let Some(t) = &self.token {
            rb = rb.header(AUTHORIZATION, t);
        }
        rb.header(HEADER_CLUSTER_ID, &self.cluster_id)
    }

    fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.api_error(resp))
    }

    fn unreachable(&self, e: reqwest::Error) -> ClientError {
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        if e.is_timeout() {
            detail = format!("timed out: {detail}");
        }
        ClientError::Unreachable {
            host: self.host.clone(),
            detail,
        }
    }

    fn api_error(&self, resp: Response) -> ClientError {
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        self.api_error_text(status, &text)
    }

    /// The error of a reply with status `status` (not 2xx) and body `text`.
    fn api_error_text(&self, status: u16, text: &str) -> ClientError {
        let host = self.host.clone();
        let Ok(body) = serde_json::from_str::<ErrorBody>(text) else {
            let message: String = text.chars().take(200).collect();
            return if status == 401 || status == 403 {
                ClientError::Unauthorized {
                    host,
                    status,
                    code: String::new(),
                    message,
                }
            } else {
                ClientError::Api {
                    host,
                    status,
                    code: String::new(),
                    message,
                }
            };
        };
        match (status, body.pos) {
            (401 | 403, _) => ClientError::Unauthorized {
                host,
                status,
                code: body.code,
                message: body.error,
            },
            (_, Some(pos)) if body.code == ErrorCode::PosMismatch.as_str() => {
                ClientError::PosMismatch { host, pos }
            }
            _ => ClientError::Api {
                host,
                status,
                code: body.code,
                message: body.error,
            },
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, resp: Response) -> Result<T> {
        let bytes = resp.bytes().map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
            host: self.host.clone(),
            detail: e.to_string(),
        })
    }

    /// `POST /sync`: what changed after each given position. `wait` asks the store to hold the
    /// request (long-poll) until something changes or the wait ends.
    pub fn sync(
        &self,
        positions: BTreeMap<String, Pos>,
        wait: Option<Duration>,
        timeout: Duration,
    ) -> Result<BTreeMap<String, Changes>> {
        let mut query = Vec::new();
        let mut rb_timeout = timeout;
        if let Some(w) = wait {
            let ms = (w.as_millis() as u64).min(wire::MAX_SYNC_WAIT_MS);
            query.push(("wait", ms.to_string()));
            rb_timeout += Duration::from_millis(ms);
        }
        let rb = self
            .request(reqwest::Method::POST, "/sync", &query)
            .timeout(rb_timeout)
            .json(&SyncRequest { positions });
        let resp: SyncResponse = self.json(self.send(rb)?)?;
        Ok(resp.changes)
    }

    /// `GET /db/page`: pages at `pos`, or at the store's latest position when `pos` is `None`
    /// (our extension: the reply's [`wire::HEADER_POS`] names it). The first of `pgnos` is the
    /// one needed, the rest are prefetch hints the store may omit. Asks for binary frames,
    /// accepts JSON. Returns the page checksums too when the store sends
    /// [`wire::HEADER_PAGE_CHECKSUMS`].
    pub fn pages(&self, db: &str, pos: Option<Pos>, pgnos: &[u32]) -> Result<Fetched> {
        self.pages_warm(db, pos, pgnos, 0)
    }

    /// [`Client::pages`] asking the store (our extension, `warm=BYTES`) to add, up to `warm`
    /// bytes, the pages every cold reader of the database needs next: the reply may then hold
    /// pages that were not asked for.
    pub fn pages_warm(
        &self,
        db: &str,
        pos: Option<Pos>,
        pgnos: &[u32],
        warm: u64,
    ) -> Result<Fetched> {
        let list = pgnos
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut query = vec![("db", db.to_string()), ("pgno", list)];
        if let Some(pos) = pos {
            query.push(("pos", pos.to_string()));
        }
        if warm > 0 {
            query.push(("warm", warm.to_string()));
        }
        let rb = self
            .request(reqwest::Method::GET, "/db/page", &query)
            .header(
                ACCEPT,
                format!("{MEDIA_PAGE_FRAMES}, application/json;q=0.5"),
            );
        let resp = self.send(rb)?;
        let checksums = self.header(&resp, wire::HEADER_PAGE_CHECKSUMS, |v| {
            wire::parse_page_checksums(v).ok()
        })?;
        let served = self.header(&resp, wire::HEADER_POS, |v| v.parse::<Pos>().ok())?;
        let size = self.header(&resp, wire::HEADER_DB_SIZE, |v| v.parse::<u32>().ok())?;
        let binary = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(MEDIA_PAGE_FRAMES));
        let pages = if binary {
            let bytes = resp.bytes().map_err(|e| self.unreachable(e))?;
            wire::decode_page_frames(&bytes).map_err(|detail| ClientError::BadResponse {
                host: self.host.clone(),
                detail,
            })?
        } else {
            self.json::<PagesResponse>(resp)?.pages
        };
        Ok(Fetched {
            pages,
            checksums,
            pos: served,
            size,
        })
    }

    /// An optional response header, parsed; present but malformed is a bad response.
    fn header<T>(
        &self,
        resp: &reqwest::blocking::Response,
        name: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        match resp.headers().get(name) {
            None => Ok(None),
            Some(v) => {
                v.to_str()
                    .ok()
                    .and_then(parse)
                    .map(Some)
                    .ok_or_else(|| ClientError::BadResponse {
                        host: self.host.clone(),
                        detail: format!("malformed {name} header"),
                    })
            }
        }
    }

    /// `POST /db/tx`: uploads one LTX file under the given lease. The timeout grows with the
    /// size: a large commit is sent, then applied and made durable by the store, before the
    /// reply comes.
    pub fn write_tx(&self, db: &str, lease_id: &str, ltx: &SpillBuf) -> Result<()> {
        let timeout =
            REQUEST_TIMEOUT + Duration::from_millis(ltx.len() / SLOWEST_COMMIT_BYTES_PER_MS);
        let query = [("db", db.to_string())];
        if let Some((http1, url)) = self.http1.as_ref().filter(|_| header_safe(lease_id)) {
            return self.write_tx_http1(http1, url.clone(), &query, lease_id, ltx, timeout);
        }
        let rb = self
            .request(reqwest::Method::POST, "/db/tx", &query)
            .timeout(timeout)
            .header(HEADER_LEASE_ID, lease_id)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(ltx.body());
        self.send(rb).map(drop)
    }

    /// [`Client::write_tx`] through [`Http1`]: the same request (URL, query, headers) on the
    /// caller's thread.
    fn write_tx_http1(
        &self,
        http1: &Http1,
        mut url: reqwest::Url,
        query: &[(&str, String)],
        lease_id: &str,
        ltx: &SpillBuf,
        timeout: Duration,
    ) -> Result<()> {
        {
            let mut pairs = url.query_pairs_mut();
            pairs.extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
            if let Some(c) = &self.cluster {
                pairs.append_pair("cluster", c);
            }
        }
        let mut headers = vec![
            (HEADER_CLUSTER_ID, self.cluster_id.as_str()),
            (HEADER_LEASE_ID, lease_id),
            ("content-type", "application/octet-stream"),
        ];
        if let Some(t) = &self.token {
            headers.push(("authorization", t.as_str()));
        }
        let reply = http1
            .post(&url, &headers, ltx, timeout, CONNECT_TIMEOUT)
            .map_err(|e| self.io_unreachable(&url, e))?;
        if (200..300).contains(&reply.status) {
            return Ok(());
        }
        Err(self.api_error_text(reply.status, &String::from_utf8_lossy(&reply.body)))
    }

    /// A failed [`Http1`] request, worded like reqwest's.
    fn io_unreachable(&self, url: &reqwest::Url, e: std::io::Error) -> ClientError {
        let mut detail = format!("error sending request for url ({url}): {e}");
        if e.kind() == std::io::ErrorKind::TimedOut {
            detail = format!("timed out: {detail}");
        }
        ClientError::Unreachable {
            host: self.host.clone(),
            detail,
        }
    }

    /// `POST /lease`: acquires (no `id`) or refreshes (`id`) the write lease.
    pub fn lease(&self, db: &str, id: Option<&str>, duration: Duration) -> Result<Lease> {
        let mut query = vec![
            ("db", db.to_string()),
            ("duration", duration.as_millis().to_string()),
        ];
        if let Some(id) = id {
            query.push(("id", id.to_string()));
        }
        let resp = self.send(self.request(reqwest::Method::POST, "/lease", &query))?;
        self.json(resp)
    }

    /// `POST /lease?id=..&hold=MS` (our extension): refreshes the lease, the store replying
    /// after `hold`; if this request's connection closes first, the store releases the lease.
    pub fn hold_lease(
        &self,
        db: &str,
        id: &str,
        duration: Duration,
        hold: Duration,
    ) -> Result<Lease> {
        let query = [
            ("db", db.to_string()),
            ("duration", duration.as_millis().to_string()),
            ("id", id.to_string()),
            ("hold", hold.as_millis().to_string()),
        ];
        let rb = self
            .request(reqwest::Method::POST, "/lease", &query)
            .timeout(hold + REQUEST_TIMEOUT);
        let resp = self.send(rb)?;
        self.json(resp)
    }

    /// `DELETE /lease`: gives the lease back.
    pub fn release_lease(&self, db: &str, id: &str) -> Result<()> {
        let query = [("db", db.to_string()), ("id", id.to_string())];
        self.send(self.request(reqwest::Method::DELETE, "/lease", &query))
            .map(drop)
    }
}
