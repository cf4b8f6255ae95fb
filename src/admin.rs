//! Admin subcommands of the `litevfs` binary: `list`, `import`, `export`, `copy`, `delete` and
//! `restore`, each a plain HTTP client of a running page store.
//!
//! Owns the command-line surface of those subcommands and turns every API error into one line
//! that names the code, the message and the host. It keeps no state and never touches a data
//! directory directly: a running `litevfs serve` is the only writer of its store.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};

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
        #[command(flatten)]
        remote: Remote,
    },
    /// Copy database SRC to DST inside the cluster (DST gets SRC's content as a new transaction).
    Copy {
        src: String,
        dst: String,
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

/// A blocking client of the admin endpoints.
struct Admin {
    http: reqwest::blocking::Client,
    remote: Remote,
}

impl Admin {
    fn new(remote: Remote) -> anyhow::Result<Admin> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Whole-database transfers can take long; the connect timeout bounds a dead host.
            .timeout(None)
            .user_agent(concat!("litevfs-admin/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Admin { http, remote })
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

    fn send(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> anyhow::Result<reqwest::blocking::Response> {
        let req = match &self.remote.token {
            Some(t) => req.header(reqwest::header::AUTHORIZATION, t),
            None => req,
        };
        let resp = req
            .send()
            .with_context(|| format!("cannot reach the page store at {}", self.remote.host))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
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
        AdminCommand::Import { name, file, .. } => {
            let txid = import(&admin, checked_name(&name)?, &file)?;
            writeln!(out, "imported {} as {name} at txid {txid}", file.display())?;
            Ok(())
        }
        AdminCommand::Export {
            name,
            file,
            format,
            force,
            ..
        } => {
            let n = export(&admin, checked_name(&name)?, &file, format, force)?;
            writeln!(
                out,
                "exported {name} to {} ({n} bytes, {})",
                file.display(),
                format.as_str()
            )?;
            Ok(())
        }
        AdminCommand::Copy { src, dst, .. } => {
            let txid = copy(&admin, checked_name(&src)?, checked_name(&dst)?)?;
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
    let map: std::collections::BTreeMap<String, Pos> = resp
        .json()
        .context("page store sent a malformed /pos reply")?;
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
fn import(admin: &Admin, name: &str, file: &Path) -> anyhow::Result<wire::Txid> {
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
    let (f, _copy) = if mode.eq_ignore_ascii_case("wal") {
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
    let body = reqwest::blocking::Body::sized(f, len);
    let resp = admin.send(
        admin
            .http
            .post(admin.url("/db/upload", &[("db", name)])?)
            .body(body),
    )?;
    let r: TxidResponse = resp
        .json()
        .context("page store sent a malformed upload reply")?;
    drop(src);
    Ok(r.txid)
}

fn export(
    admin: &Admin,
    name: &str,
    file: &Path,
    format: Format,
    force: bool,
) -> anyhow::Result<u64> {
    if file.exists() && !force {
        bail!("{} exists; pass --force to replace it", file.display());
    }
    let url = admin.url("/db/snapshot", &[("db", name), ("format", format.as_str())])?;
    let mut resp = admin.send(admin.http.get(url))?;
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let n = resp.copy_to(&mut tmp).context("download interrupted")?;
    verify_export(tmp.path(), format)?;
    tmp.as_file().sync_all()?;
    tmp.persist(file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(n)
}

/// Checks a downloaded snapshot before it replaces anything: LTX files are fully decoded (which
/// verifies every checksum), SQLite files must have a valid header of the right size.
fn verify_export(path: &Path, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Ltx => {
            let r = crate::ltx::Reader::new(io::BufReader::new(File::open(path)?))?;
            r.finish()
                .context("downloaded LTX snapshot does not verify")?;
        }
        Format::Sqlite => {
            let bytes = std::fs::read(path)?;
            if bytes.is_empty() {
                return Ok(());
            }
            let h = crate::dbfile::DbHeader::parse(&bytes)
                .context("downloaded file is not a SQLite database")?;
            if bytes.len() as u64 % h.page_size as u64 != 0 {
                bail!("downloaded database is not a whole number of pages");
            }
        }
    }
    Ok(())
}

fn copy(admin: &Admin, src: &str, dst: &str) -> anyhow::Result<wire::Txid> {
    let dir = tempfile::tempdir()?;
    let tmp = dir.path().join("copy.db");
    export(admin, src, &tmp, Format::Sqlite, true)?;
    import(admin, dst, &tmp)
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
    let r: TxidResponse = resp
        .json()
        .context("page store sent a malformed restore reply")?;
    Ok(r.txid)
}
