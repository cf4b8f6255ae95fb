//! `litevfs serve`: the page store, speaking the LiteFS Cloud HTTP API (spec sections 2 and 3)
//! plus our extensions (binary page frames, long-poll sync, snapshots at older positions).
//!
//! Owns the process: configuration ([`config`]), the HTTP surface ([`routes`], [`handlers`],
//! [`auth`], [`body`], [`error`], [`metrics`]) and the durable store ([`store`]). Invariant: a
//! request is answered only after the store finished (and, for writes, fsynced) its work; every
//! reply that is not a success is a JSON error body. See `docs/server.md` for the user's view.

pub mod auth;
pub mod body;
pub mod bucket;
pub mod config;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod routes;
pub mod store;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

pub use config::{Config, ServeArgs};
use metrics::Metrics;
use store::Store;

/// Shared state of the running server.
pub struct App {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Metrics,
    /// Becomes `true` when the server starts shutting down (ends long-polls early).
    pub shutdown: watch::Receiver<bool>,
    /// Workers applying a commit on their own thread ([`handlers::inline_or_in_place`]).
    pub inline_commits: std::sync::atomic::AtomicUsize,
}

/// Runs `litevfs serve` until SIGTERM or ctrl-c.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tune_allocator();
    init_tracing();
    let config = Config::from_args(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(config))
}

/// Arguments of `litevfs repack`.
#[derive(clap::Args, Debug)]
pub struct RepackArgs {
    /// The data directory of a stopped local store (or of a bucket's cache).
    #[arg(long, env = "LITEVFS_DATA_DIR", default_value = "./litevfs-data")]
    pub data_dir: std::path::PathBuf,
}

/// Runs `litevfs repack`: rewrites a stopped store's `store.db` compactly
/// ([`store::repack`]).
pub fn repack(args: RepackArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    let r = store::repack::repack(dir)
        .with_context(|| format!("repacking the store in {}", dir.display()))?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "repacked {}: {:.1} MB -> {:.1} MB (store pages of {} -> {} bytes)",
        dir.join("store.db").display(),
        mb(r.bytes_before),
        mb(r.bytes_after),
        r.page_size_before,
        r.page_size_after
    );
    Ok(())
}

/// Arguments of `litevfs backup`.
#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// The data directory of a local store, its server running or not.
    #[arg(long, env = "LITEVFS_DATA_DIR", default_value = "./litevfs-data")]
    pub data_dir: std::path::PathBuf,
    /// Where the copy goes: a new or empty directory, usable as a data directory.
    pub dest: std::path::PathBuf,
}

/// Runs `litevfs backup`: a consistent copy of a local store ([`store::backup`]).
pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let b = store::backup::backup(&args.data_dir, &args.dest).with_context(|| {
        format!(
            "backing up the store in {} to {}",
            args.data_dir.display(),
            args.dest.display()
        )
    })?;
    println!(
        "backed up {} to {}: store.db {:.1} MB, {} object file(s) with {:.1} MB of pages",
        args.data_dir.display(),
        args.dest.display(),
        b.store_bytes as f64 / 1e6,
        b.objects,
        b.object_bytes as f64 / 1e6
    );
    Ok(())
}

/// Keeps the resident memory of large transfers bounded. glibc's allocator raises its mmap
/// threshold each time a large buffer is freed, after which megabyte-sized buffers (snapshot
/// batches, multipart parts) come from per-thread arenas that seldom give memory back, so each
/// blocking thread that once moved a large database keeps tens of megabytes. A fixed threshold
/// maps such buffers and unmaps them on free; fewer arenas bound what small buffers leave behind.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (no pointers involved); it runs before
    // the runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Opens the store: `store.db` in the data directory, or (with `--store`) the bucket with the
/// data directory as its cache. Checks that the bucket answers, so bad credentials stop the start.
async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let data_dir = config.data_dir.clone();
    let Some(b) = config.bucket.clone() else {
        return Store::open(&data_dir, config.retention)
            .with_context(|| format!("opening the store in {}", data_dir.display()));
    };
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let url = b.conn.url.clone();
        let bucket = bucket::Bucket::open(&b.conn, rt)?;
        Store::open_bucket(&data_dir, Arc::new(bucket), b.remote).with_context(|| {
            format!(
                "opening the object store {url} (cache in {})",
                data_dir.display()
            )
        })
    })
    .await?
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    if config.tokens.is_empty() {
        eprintln!(
            "litevfs serve: no tokens configured: anonymous read-write access for anyone who can reach {addr}"
        );
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = Arc::new(App {
        config,
        store: Arc::new(store),
        metrics: Metrics::default(),
        shutdown: shutdown_rx,
        inline_commits: std::sync::atomic::AtomicUsize::new(0),
    });
    tokio::spawn(compaction_loop(app.clone()));
    if let Some(b) = &app.config.bucket {
        tokio::spawn(poll_loop(app.clone(), b.remote.poll_interval));
        tracing::info!(%addr, store = %b.conn.url, cache = %app.config.data_dir.display(), "page store ready");
    } else {
        tracing::info!(%addr, data_dir = %app.config.data_dir.display(), "page store ready");
    }
    println!("litevfs serve: listening on http://{addr}");
    std::io::stdout().flush()?;
    let header_timeout = app.config.header_timeout;
    accept_loop(
        listener,
        routes::router(app.clone()),
        header_timeout,
        move || {
            tracing::info!("shutting down");
            let _ = shutdown_tx.send(true);
        },
    )
    .await;
    Ok(())
}

/// Serves connections until SIGTERM or ctrl-c, then lets in-flight requests finish (long-polls
/// end early on the shutdown signal; a stalled one is cut off after a grace period).
///
/// A connection must deliver each request head within `header_timeout` (this also closes idle
/// keep-alive connections), so clients that open connections and send nothing cannot hold
/// them forever; bodies and snapshot streams have their own stall timeout.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    on_shutdown: impl FnOnce(),
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    // HTTP/1.1 only (every client of this API speaks it): a builder that detects HTTP/2 waits
    // for a connection's first bytes before any timer runs, so a silent client would stay.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut signal => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
        });
    }
    drop(listener);
    on_shutdown();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting anyway");
    }
}

/// How long a shutdown waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn compaction_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.config.compaction_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if *app.shutdown.borrow() {
            return;
        }
        let store = app.store.clone();
        match tokio::task::spawn_blocking(move || store.compact()).await {
            Ok(Ok(stats)) => {
                Metrics::add(&app.metrics.compactions, 1);
                Metrics::add(&app.metrics.compacted_page_versions, stats.pages_deleted);
                Metrics::add(&app.metrics.bucket_segments, stats.bucket.segments_written);
                Metrics::add(&app.metrics.bucket_images, stats.bucket.images_written);
                Metrics::add(&app.metrics.bucket_deleted, stats.bucket.objects_deleted);
                app.metrics
                    .page_versions
                    .store(stats.page_versions, std::sync::atomic::Ordering::Relaxed);
                app.metrics.set_database_bytes(
                    stats
                        .databases
                        .iter()
                        .map(|d| (d.key.cluster.clone(), d.key.name.clone(), d.bytes))
                        .collect(),
                );
                if stats.pages_deleted > 0 || stats.txns_deleted > 0 {
                    tracing::debug!(?stats, "compacted");
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "compaction failed"),
            Err(e) => tracing::warn!(error = %e, "compaction task failed"),
        }
    }
}

/// Most databases the poller refreshes at once.
const POLL_CONCURRENCY: usize = 16;

/// Bucket mode: every `interval`, looks for commits made through other servers in the databases
/// that have long-polling readers or a lease granted here, so those readers see them.
async fn poll_loop(app: Arc<App>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        tick.tick().await;
        if *app.shutdown.borrow() {
            return;
        }
        let keys = app.store.active_databases();
        for chunk in keys.chunks(POLL_CONCURRENCY) {
            let tasks: Vec<_> = chunk
                .iter()
                .cloned()
                .map(|key| {
                    let store = app.store.clone();
                    tokio::task::spawn_blocking(move || (store.poll(&key), key))
                })
                .collect();
            for t in tasks {
                if let Ok((Err(e), key)) = t.await
                    && warned.elapsed() > Duration::from_secs(10)
                {
                    warned = std::time::Instant::now();
                    tracing::warn!(db = %key.name, error = %e, "polling the object store");
                }
            }
        }
    }
}
