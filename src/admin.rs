//! Admin subcommands of the `litevfs` binary: `list`, `import`, `export`, `copy`, `delete` and
//! `restore`, each a plain HTTP client of a running page store.
//!
//! Owns the command-line surface of those subcommands and turns every API error into one line
//! that names the code, the message and the host. It keeps no state and never touches a data
//! directory directly: a running `litevfs serve` is the only writer of its store.
//!
//! Whole databases stream in both directions, so memory stays small whatever their size: an
//! upload is read from the file in small chunks by a thread while the connection sends them,
//! and the reply is read while the body is still being sent, so a server that refuses an upload
//! early (a wrong token, say) is heard, with its code and message, instead of the broken
//! connection that follows; a download goes to a temporary file chunk by chunk and is verified
//! there before it replaces anything. Transfers show a progress line on a terminal
//! ([`progress`]).

mod progress;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};

use self::progress::Progress;
use crate::wire::{self, ErrorBody, Pos, TxidResponse};

/// Where the page store is and who we are to it; shared by every admin subcommand.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Base URL of the page store.
    #[arg(
        long,
        env = "LITEFS_CLOUD_HOST",
        default_value = "http://127.0.0.1:20202"
    )]
    pub host: String,
    /// Token sent verbatim in the Authorization header.
    #[arg(long, env = "LITEFS_CLOUD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Cluster (namespace), sent as `?cluster=` on every request.
    #[arg(long, env = "LITEFS_CLOUD_CLUSTER")]
    pub cluster: Option<String>,
}

/// Snapshot formats `export` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A plain SQLite database file.
    Sqlite,
    /// An LTX v1 snapshot file.
    Ltx,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Sqlite => "sqlite",
            Format::Ltx => "ltx",
        }
    }
}

/// The admin subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List the databases in the cluster with their positions.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Upload a SQLite database file as database NAME (a new transaction on top of any history).
    Import {
        /// Database name in the store.
        name: String,
        /// Path of the SQLite file to upload.
        file: PathBuf,
        /// No progress line (it is shown only when stderr is a terminal anyway).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Download database NAME at its current position into FILE.
    Export {
        name: String,
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Sqlite)]
        format: Format,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        /// No progress line (it is shown only when stderr is a terminal anyway).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Copy database SRC to DST inside the cluster (DST gets SRC's content as a new transaction).
    Copy {
        src: String,
        dst: String,
        /// No progress line (it is shown only when stderr is a terminal anyway).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete database NAME and all its history. Asks for nothing: scripts call this.
    Delete {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Bring database NAME back to an earlier transaction or time (within the store's retention);
    /// the old state is re-applied as a new transaction.
    Restore {
        name: String,
        /// Target TXID (16 hex digits, as `list` prints).
        #[arg(
            long,
            conflicts_with = "timestamp",
            required_unless_present = "timestamp"
        )]
        txid: Option<String>,
        /// Target time, RFC 3339 (e.g. 2026-11-21T10:00:00Z).
        #[arg(long)]
        timestamp: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

impl AdminCommand {
    fn remote(&self) -> &Remote {
        match self {
            AdminCommand::List { remote }
            | AdminCommand::Import { remote, .. }
            | AdminCommand::Export { remote, .. }
            | AdminCommand::Copy { remote, .. }
            | AdminCommand::Delete { remote, .. }
            | AdminCommand::Restore { remote, .. } => remote,
        }
    }
}

/// A client of the admin endpoints: an async HTTP client driven by a runtime of its own on the
/// calling thread (each call blocks until its reply).
struct Admin {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    remote: Remote,
}

impl Admin {
    fn new(remote: Remote) -> anyhow::Result<Admin> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Whole-database transfers can take long; the connect timeout bounds a dead host.
            .user_agent(concat!("litevfs-admin/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Admin { rt, http, remote })
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<reqwest::Url> {
        let base = reqwest::Url::parse(&self.remote.host)
            .with_context(|| format!("invalid page store URL {:?}", self.remote.host))?;
        let mut url = base.join(path)?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
            if let Some(c) = &self.remote.cluster {
                q.append_pair("cluster", c);
            }
        }
        Ok(url)
    }

    fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let req = match &self.remote.token {
            Some(t) => req.header(reqwest::header::AUTHORIZATION, t),
            None => req,
        };
        let resp = self
            .rt
            .block_on(req.send())
            .with_context(|| format!("cannot reach the page store at {}", self.remote.host))?;
        self.check(resp)
    }

    /// The reply if it is a success; otherwise an error naming the server's code and message.
    fn check(&self, resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = match self.rt.block_on(resp.text()) {
            Ok(t) => t,
            Err(e) => format!("(its reply could not be read: {e})"),
        };
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => {
                let hint = if status == 401 {
                    " (check LITEFS_CLOUD_TOKEN / --token)"
                } else {
                    ""
                };
                let pos = body
                    .pos
                    .map(|p| format!(" (store position {p})"))
                    .unwrap_or_default();
                bail!(
                    "{}: {}{pos}{hint} [HTTP {status} from {}]",
                    body.code,
                    body.error,
                    self.remote.host
                )
            }
            Err(_) => bail!("HTTP {status} from {}: {}", self.remote.host, text.trim()),
        }
    }

    /// The JSON reply of a successful request.
    fn json<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        what: &str,
    ) -> anyhow::Result<T> {
        self.rt
            .block_on(resp.json())
            .with_context(|| format!("page store sent a malformed {what} reply"))
    }
}

fn checked_name(name: &str) -> anyhow::Result<&str> {
    wire::validate_db_name(name).with_context(|| format!("invalid database name {name:?}"))?;
    Ok(name)
}

/// Runs one admin subcommand, printing its result on stdout.
pub fn run(cmd: AdminCommand) -> anyhow::Result<()> {
    let admin = Admin::new(cmd.remote().clone())?;
    let mut out = io::stdout().lock();
    match cmd {
        AdminCommand::List { .. } => list(&admin, &mut out),
        AdminCommand::Import {
            name, file, quiet, ..
        } => {
            let txid = import(&admin, checked_name(&name)?, &file, quiet)?;
            writeln!(out, "imported {} as {name} at txid {txid}", file.display())?;
            Ok(())
        }
        AdminCommand::Export {
            name,
            file,
            format,
            force,
            quiet,
            ..
        } => {
            let n = export(&admin, checked_name(&name)?, &file, format, force, quiet)?;
            writeln!(
                out,
                "exported {name} to {} ({n} bytes, {})",
                file.display(),
                format.as_str()
            )?;
            Ok(())
        }
        AdminCommand::Copy {
            src, dst, quiet, ..
        } => {
            let txid = copy(&admin, checked_name(&src)?, checked_name(&dst)?, quiet)?;
            writeln!(out, "copied {src} to {dst} at txid {txid}")?;
            Ok(())
        }
        AdminCommand::Delete { name, .. } => {
            admin.send(
                admin
                    .http
                    .delete(admin.url("/db", &[("db", checked_name(&name)?)])?),
            )?;
            writeln!(out, "deleted {name}")?;
            Ok(())
        }
        AdminCommand::Restore {
            name,
            txid,
            timestamp,
            ..
        } => {
            let txid = restore(&admin, checked_name(&name)?, txid, timestamp)?;
            writeln!(out, "restored {name}; new txid {txid}")?;
            Ok(())
        }
    }
}

fn list(admin: &Admin, out: &mut impl Write) -> anyhow::Result<()> {
    let resp = admin.send(admin.http.get(admin.url("/pos", &[])?))?;
    let map: std::collections::BTreeMap<String, Pos> = admin.json(resp, "/pos")?;
    writeln!(out, "{:<40} {:>16} {:>16}", "NAME", "TXID", "CHECKSUM")?;
    for (name, pos) in map {
        writeln!(out, "{name:<40} {} {}", pos.txid, pos.checksum)?;
    }
    Ok(())
}

/// Uploads `file` as SQLite reads it, as one consistent snapshot:
/// - a rollback-journal database is streamed as it is on disk while a read transaction holds
///   SQLite's shared lock on it, so no other process commits meanwhile (and a hot journal left by
///   a crashed writer is rolled back first);
/// - a WAL database is copied with SQLite's online backup API (in one step, so from one read
///   snapshot) into a temporary file, which is streamed: the committed frames of its `-wal` are
///   in the copy, which copying the main file alone would lose.
fn import(admin: &Admin, name: &str, file: &Path, quiet: bool) -> anyhow::Result<wire::Txid> {
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut head = [0u8; crate::dbfile::HEADER_SIZE];
    std::io::Read::read_exact(&mut &f, &mut head)
        .map_err(|_| anyhow::anyhow!("{} is not a SQLite database (too short)", file.display()))?;
    crate::dbfile::DbHeader::parse(&head)
        .with_context(|| format!("{} is not a usable SQLite database", file.display()))?;
    let sqlite_err = |e: rusqlite::Error| {
        anyhow::anyhow!("SQLite cannot read {} as a database: {e}", file.display())
    };
    let src = rusqlite::Connection::open_with_flags(
        file,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_err)?;
    src.busy_timeout(Duration::from_secs(30))
        .map_err(sqlite_err)?;
    let mode: String = src
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(sqlite_err)?;
    let label = format!("import {name}");
    let (f, _copy) = if mode.eq_ignore_ascii_case("wal") {
        Progress::new(&label, None, quiet).note("copying the WAL database to one snapshot");
        let copy = tempfile::Builder::new()
            .prefix("litevfs-import-")
            .tempfile()
            .context("cannot create a temporary file for the snapshot (TMPDIR)")?;
        let mut dst = rusqlite::Connection::open(copy.path()).map_err(sqlite_err)?;
        {
            let b = rusqlite::backup::Backup::new(&src, &mut dst).map_err(sqlite_err)?;
            b.step(-1).map_err(sqlite_err)?;
        }
        dst.close().map_err(|(_, e)| sqlite_err(e))?;
        (File::open(copy.path())?, Some(copy))
    } else {
        // The shared lock lasts until `src` is dropped, after the upload.
        src.execute_batch("BEGIN; SELECT count(*) FROM sqlite_master;")
            .map_err(sqlite_err)?;
        (File::open(file)?, None)
    };
    let len = f.metadata()?.len();
    let progress = Arc::new(Mutex::new(Progress::new(label, Some(len), quiet)));
    let resp = upload(
        admin,
        admin.url("/db/upload", &[("db", name)])?,
        f,
        len,
        &progress,
    )?;
    let r: TxidResponse = admin.json(resp, "upload")?;
    drop(src);
    Ok(r.txid)
}

/// Bytes per chunk an upload reads from its file.
const UPLOAD_CHUNK: usize = 256 << 10;
/// Chunks read ahead of the connection.
const UPLOAD_AHEAD: usize = 4;

/// POSTs `len` bytes of `f` to `url` and returns the successful reply. The reply is read while
/// the body is still being sent: a server that refuses the upload before reading it all answers
/// with its error, which is what this reports (and not the broken connection that follows).
fn upload(
    admin: &Admin,
    url: reqwest::Url,
    f: File,
    len: u64,
    progress: &Arc<Mutex<Progress>>,
) -> anyhow::Result<reqwest::Response> {
    let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_AHEAD);
    // Not joined: it ends when the file is read or when the body (and its channel) is dropped,
    // which for a refused upload may be only when the runtime is.
    std::thread::spawn(move || read_chunks(f, len, tx));
    let read_error = Arc::new(Mutex::new(None));
    let body = FileBody {
        rx,
        left: len,
        progress: progress.clone(),
        read_error: read_error.clone(),
    };
    let mut req = admin
        .http
        .post(url)
        .header(reqwest::header::CONTENT_LENGTH, len)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap(body));
    if let Some(t) = &admin.remote.token {
        req = req.header(reqwest::header::AUTHORIZATION, t);
    }
    let sent = admin.rt.block_on(req.send());
    let done = progress.lock().unwrap_or_else(|e| e.into_inner()).done();
    match sent {
        Ok(resp) => admin.check(resp),
        Err(e) => {
            if let Some(msg) = read_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
                bail!(
                    "cannot read the database file while uploading it: {msg}; nothing was imported"
                );
            }
            let host = &admin.remote.host;
            if e.is_connect() {
                return Err(e).context(format!("cannot reach the page store at {host}"));
            }
            Err(e).context(if done < len {
                format!(
                    "the connection to the page store at {host} broke after {done} of {len} \
                     bytes, without a reply; nothing was imported"
                )
            } else {
                format!(
                    "the page store at {host} did not reply to the upload of all {len} bytes; \
                     it may or may not have imported it (`litevfs list` shows its position)"
                )
            })
        }
    }
}

/// Reads `len` bytes of `f` in chunks into `tx`, until done, a read error (sent as the last
/// item) or the receiver is gone.
fn read_chunks(mut f: File, len: u64, tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>) {
    let mut left = len;
    while left > 0 {
        let n = UPLOAD_CHUNK.min(left as usize);
        let mut buf = vec![0u8; n];
        let item = match f.read_exact(&mut buf) {
            Ok(()) => Ok(Bytes::from(buf)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
                e.kind(),
                "the file shrank while being uploaded",
            )),
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return;
        }
        left -= n as u64;
    }
}

/// A request body fed by [`read_chunks`]; counts what the connection takes.
struct FileBody {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    left: u64,
    progress: Arc<Mutex<Progress>>,
    /// The file's read error, if reading it failed (the upload then fails too).
    read_error: Arc<Mutex<Option<String>>>,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.left -= chunk.len() as u64;
                self.progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(chunk.len() as u64);
                if self.left == 0 {
                    self.progress
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .finish(Some("sent; the store is committing it"));
                }
                Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => {
                *self.read_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file reader stopped early",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

fn export(
    admin: &Admin,
    name: &str,
    file: &Path,
    format: Format,
    force: bool,
    quiet: bool,
) -> anyhow::Result<u64> {
    if file.exists() && !force {
        bail!("{} exists; pass --force to replace it", file.display());
    }
    let url = admin.url("/db/snapshot", &[("db", name), ("format", format.as_str())])?;
    let resp = admin.send(admin.http.get(url))?;
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let mut progress = Progress::new(format!("export {name}"), resp.content_length(), quiet);
    let n = download(admin, resp, tmp.as_file(), &mut progress)?;
    progress.finish(Some("verifying"));
    verify_export(tmp.path(), format)?;
    tmp.as_file().sync_all()?;
    tmp.persist(file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(n)
}

/// Writes the body of `resp` to `out` as it arrives; returns its length.
fn download(
    admin: &Admin,
    mut resp: reqwest::Response,
    out: &File,
    progress: &mut Progress,
) -> anyhow::Result<u64> {
    let expected = resp.content_length();
    let file = out;
    let mut out = io::BufWriter::with_capacity(1 << 20, out);
    // Bytes whose write-back to disk was started: the sync at the end then finds little left.
    let mut flushing = 0u64;
    loop {
        let chunk = admin.rt.block_on(resp.chunk()).with_context(|| {
            let of = expected.map(|n| format!(" of {n}")).unwrap_or_default();
            format!(
                "download interrupted after {}{of} bytes (nothing was written)",
                progress.done()
            )
        })?;
        let Some(chunk) = chunk else { break };
        out.write_all(&chunk)
            .context("cannot write the downloaded database")?;
        progress.add(chunk.len() as u64);
        if progress.done() >= flushing + WRITEBACK_STEP {
            out.flush()
                .context("cannot write the downloaded database")?;
            start_writeback(file, flushing, progress.done() - flushing);
            flushing = progress.done();
        }
    }
    out.flush()
        .context("cannot write the downloaded database")?;
    let n = progress.done();
    if let Some(want) = expected.filter(|&w| w != n) {
        bail!("download interrupted after {n} of {want} bytes (nothing was written)");
    }
    Ok(n)
}

/// A download's write-back to disk is started in steps of this many bytes.
const WRITEBACK_STEP: u64 = 32 << 20;

/// Starts writing `len` bytes of `file` from `offset` to disk in the background (advisory: on
/// error the final sync does the work).
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor; it writes no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Checks a downloaded snapshot before it replaces anything: LTX files are fully decoded (which
/// verifies every checksum), SQLite files must have a valid header and a whole number of pages.
/// Either way the file is read as a stream, never held in memory.
fn verify_export(path: &Path, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Ltx => {
            let r = crate::ltx::Reader::new(io::BufReader::new(File::open(path)?))?;
            r.finish()
                .context("downloaded LTX snapshot does not verify")?;
        }
        Format::Sqlite => {
            let mut f = File::open(path)?;
            let len = f.metadata()?.len();
            if len == 0 {
                return Ok(());
            }
            let mut head = [0u8; crate::dbfile::HEADER_SIZE];
            f.read_exact(&mut head)
                .context("downloaded file is not a SQLite database (too short)")?;
            let h = crate::dbfile::DbHeader::parse(&head)
                .context("downloaded file is not a SQLite database")?;
            if len % h.page_size as u64 != 0 {
                bail!("downloaded database is not a whole number of pages");
            }
        }
    }
    Ok(())
}

fn copy(admin: &Admin, src: &str, dst: &str, quiet: bool) -> anyhow::Result<wire::Txid> {
    let dir = tempfile::tempdir()?;
    let tmp = dir.path().join("copy.db");
    export(admin, src, &tmp, Format::Sqlite, true, quiet)?;
    import(admin, dst, &tmp, quiet)
}

fn restore(
    admin: &Admin,
    name: &str,
    txid: Option<String>,
    timestamp: Option<String>,
) -> anyhow::Result<wire::Txid> {
    let mut q = vec![("db", name)];
    if let Some(t) = &txid {
        t.parse::<wire::Txid>()
            .context("--txid takes 16 hex digits")?;
        q.push(("txid", t));
    }
    if let Some(ts) = &timestamp {
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .context("--timestamp takes an RFC 3339 time, e.g. 2026-11-21T10:00:00Z")?;
        q.push(("timestamp", ts));
    }
    let resp = admin.send(admin.http.post(admin.url("/db/restore", &q)?))?;
    let r: TxidResponse = admin.json(resp, "restore")?;
    Ok(r.txid)
}
