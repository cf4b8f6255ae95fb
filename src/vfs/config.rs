//! Configuration: the environment read once at load time, and the per-database tunables.
//!
//! Owns [`Config`] (environment variables, fixed for the life of the process) and [`Settings`]
//! (the values `PRAGMA litevfs_*` reads and changes, with their defaults). It parses and
//! validates values; it does not apply them.

use std::path::PathBuf;
use std::time::Duration;

/// Default page store: what `litevfs serve` listens on by default.
pub const DEFAULT_HOST: &str = "http://127.0.0.1:20202";

/// Process-wide configuration from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `LITEFS_CLOUD_HOST`: scheme and host of the page store.
    pub host: String,
    /// `LITEFS_CLOUD_TOKEN`: sent verbatim as `Authorization`.
    pub token: Option<String>,
    /// `LITEFS_CLOUD_CLUSTER`: sent as `?cluster=` on every request.
    pub cluster: Option<String>,
    /// `LITEVFS_CACHE_DIR`: where page caches live. `None`: a fresh directory under the system
    /// temp dir, created on first use and never reused.
    pub cache_dir: Option<PathBuf>,
    /// `LITEVFS_LOG_FILE`: log here instead of stderr.
    pub log_file: Option<PathBuf>,
    /// `LITEVFS_COMMIT_DEADLINE` (seconds): how long a commit whose reply was lost is pursued
    /// before its outcome is reported unknown.
    pub commit_deadline: Duration,
    /// `LITEVFS_TXN_MEMORY` (bytes): how much of a write transaction's pages, and of each
    /// rollback journal, is kept in memory before the rest spills to the cache directory.
    pub txn_memory: u64,
    /// `LITEVFS_OPEN_PREFETCH` (bytes): what the request that opens a database asks the store
    /// to add to page 1 (the schema and the interior b-tree pages); 0 asks for nothing.
    pub open_prefetch: u64,
    /// `LITEVFS_DEFAULT_VFS`: every entry point makes `litevfs` the default VFS, as
    /// `sqlite3_litevfs_default_init` always does. For hosts whose extension loader cannot name
    /// an entry point, or whose open call takes no URI and no VFS name.
    pub default_vfs: bool,
}

/// Default of `LITEVFS_OPEN_PREFETCH`.
pub const DEFAULT_OPEN_PREFETCH: u64 = 4 << 20;

/// Parses `LITEVFS_OPEN_PREFETCH`: a byte count up to 16 MiB (a page reply's cap).
pub fn parse_open_prefetch(v: &str) -> Result<u64, String> {
    match parse_bytes(v) {
        Some(n) if n <= 16 << 20 => Ok(n),
        _ => Err(format!(
            "invalid LITEVFS_OPEN_PREFETCH {v:?}: a byte count from 0 to 16MiB (e.g. 4MiB); using 4MiB"
        )),
    }
}

/// Default of `LITEVFS_COMMIT_DEADLINE`.
pub const DEFAULT_COMMIT_DEADLINE: Duration = Duration::from_secs(30);

/// Parses `LITEVFS_COMMIT_DEADLINE`: seconds, 1 to 3600.
pub fn parse_commit_deadline(v: &str) -> Result<Duration, String> {
    match v.trim().parse::<u64>() {
        Ok(s @ 1..=3600) => Ok(Duration::from_secs(s)),
        _ => Err(format!(
            "invalid LITEVFS_COMMIT_DEADLINE {v:?}: whole seconds from 1 to 3600; using {}",
            DEFAULT_COMMIT_DEADLINE.as_secs()
        )),
    }
}

/// Parses `LITEVFS_DEFAULT_VFS`: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`, in any
/// case. Anything else is an error rather than a guess: a switch that silently stayed off would
/// let a host open a local file where the page store was meant.
pub fn parse_default_vfs(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "invalid LITEVFS_DEFAULT_VFS {v:?}: 1, true, yes or on make litevfs the default VFS; \
             0, false, no or off (or unset) leave the choice to the entry point"
        )),
    }
}

impl Config {
    /// Reads the environment. Empty values count as unset. A bad `LITEVFS_DEFAULT_VFS` is an
    /// error (the extension does not load); a bad `LITEVFS_COMMIT_DEADLINE` is named on stderr
    /// and the default used.
    pub fn from_env() -> Result<Config, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let host = var("LITEFS_CLOUD_HOST").unwrap_or_else(|| DEFAULT_HOST.to_string());
        let default_vfs = match var("LITEVFS_DEFAULT_VFS") {
            Some(v) => parse_default_vfs(&v)?,
            None => false,
        };
        Ok(Config {
            host: normalize_host(&host),
            token: var("LITEFS_CLOUD_TOKEN"),
            cluster: var("LITEFS_CLOUD_CLUSTER"),
            cache_dir: var("LITEVFS_CACHE_DIR").map(PathBuf::from),
            log_file: var("LITEVFS_LOG_FILE").map(PathBuf::from),
            commit_deadline: var("LITEVFS_COMMIT_DEADLINE").map_or(DEFAULT_COMMIT_DEADLINE, |v| {
                parse_commit_deadline(&v).unwrap_or_else(|e| {
                    // Logging is not set up yet when the environment is read.
                    eprintln!("litevfs: {e}");
                    DEFAULT_COMMIT_DEADLINE
                })
            }),
            txn_memory: var("LITEVFS_TXN_MEMORY").map_or(super::spill::DEFAULT_TXN_MEMORY, |v| {
                super::spill::parse_txn_memory(&v).unwrap_or_else(|e| {
                    eprintln!("litevfs: {e}");
                    super::spill::DEFAULT_TXN_MEMORY
                })
            }),
            open_prefetch: var("LITEVFS_OPEN_PREFETCH").map_or(DEFAULT_OPEN_PREFETCH, |v| {
                parse_open_prefetch(&v).unwrap_or_else(|e| {
                    eprintln!("litevfs: {e}");
                    DEFAULT_OPEN_PREFETCH
                })
            }),
            default_vfs,
        })
    }
}

/// Keeps scheme and authority only (clients serve the API at the root, spec 1.2); adds
/// `http://` when no scheme is given.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let with_scheme = if host.contains("://") {
        host.to_string()
    } else {
        format!("http://{host}")
    };
    let (scheme, rest) = with_scheme.split_once("://").expect("has scheme");
    let authority = rest.split('/').next().unwrap_or("");
    format!("{scheme}://{authority}")
}

/// Per-database tunables, changed with `PRAGMA litevfs_*` and shared by every connection of
/// this process to that database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How often the change poller asks the store about this database; zero turns automatic
    /// syncing off (only `PRAGMA litevfs_sync` syncs then).
    pub sync_period: Duration,
    /// Most pages kept in the local cache; zero means no limit.
    pub max_cached_pages: u64,
    /// Pages are evicted while the cache's file system has less free space than this (bytes).
    pub min_available_space: u64,
    /// Most remote requests one query may make; zero means no limit.
    pub max_reqs_per_query: u32,
    /// Pages fetched besides the one needed when a read-ahead pattern starts (and with each
    /// point lookup's b-tree prefetch).
    pub max_prefetch_pages: u32,
    /// The most bytes one read-ahead request grows to while a scan goes on; 0 keeps every
    /// request at `max_prefetch_pages`.
    pub max_readahead_bytes: u64,
}

impl Settings {
    /// The read-ahead window in pages of `page_size` bytes: where it starts and its cap.
    pub fn prefetch_window(&self, page_size: u32) -> (u32, u32) {
        let base = self.max_prefetch_pages;
        let cap = (self.max_readahead_bytes / u64::from(page_size.max(1)))
            .min(u64::from(MAX_PREFETCH_LIMIT)) as u32;
        (base, if base == 0 { 0 } else { cap.max(base) })
    }
}

/// Upper bound of `litevfs_max_prefetch_pages`, and of any one read-ahead request.
pub const MAX_PREFETCH_LIMIT: u32 = 1024;
/// Upper bound of `litevfs_max_readahead_bytes`.
pub const MAX_READAHEAD_LIMIT: u64 = 64 << 20;

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            sync_period: Duration::from_secs(1),
            max_cached_pages: 262_144,
            min_available_space: 10 << 20,
            max_reqs_per_query: 0,
            max_prefetch_pages: 32,
            max_readahead_bytes: 4 << 20,
        }
    }
}

/// Parses a duration: `250ms`, `2s`, `1m`, or a bare integer number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s
        .trim()
        .trim_matches(|c| c == '\'' || c == '"')
        .trim()
        .to_ascii_lowercase();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s.as_str(), 1000)
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult_ms)
        .filter(|ms| *ms <= 86_400_000)
        .map(Duration::from_millis)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses a byte count: a bare integer, or with a `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s
        .trim()
        .trim_matches(|c| c == '\'' || c == '"')
        .trim()
        .to_ascii_uppercase();
    let s = s
        .strip_suffix("IB")
        .or_else(|| s.strip_suffix('B'))
        .unwrap_or(&s);
    let (num, shift) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 10),
        'M' => (&s[..s.len() - 1], 20),
        'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// Parses a non-negative integer no larger than `max`.
pub fn parse_count(s: &str, max: u64) -> Option<u64> {
    let s = s.trim().trim_matches(|c| c == '\'' || c == '"').trim();
    s.parse::<u64>().ok().filter(|n| *n <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("'1m'"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "-1", "1h", "abc", "1.5s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(1)), "1s");
    }

    #[test]
    fn bytes_and_counts() {
        assert_eq!(parse_bytes("10M"), Some(10 << 20));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_count("5", 10), Some(5));
        assert_eq!(parse_count("11", 10), None);
        assert_eq!(parse_count("-1", 10), None);
    }

    #[test]
    fn default_vfs_switch() {
        for on in ["1", "true", "YES", " On "] {
            assert_eq!(parse_default_vfs(on), Ok(true), "{on}");
        }
        for off in ["0", "false", "No", "OFF"] {
            assert_eq!(parse_default_vfs(off), Ok(false), "{off}");
        }
        for bad in ["2", "y", "enabled", "litevfs", "-1"] {
            let e = parse_default_vfs(bad).unwrap_err();
            assert!(e.starts_with("invalid LITEVFS_DEFAULT_VFS"), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(normalize_host("127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(normalize_host("https://x.io/some/path"), "https://x.io");
    }
}
