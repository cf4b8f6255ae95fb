//! `PRAGMA litevfs_*`: parsed into [`Pragma`], then evaluated against one database.
//!
//! Owns the pragma names, their argument syntax, what reading each returns, and the error that
//! says which values are allowed. Settings are per database and shared by the connections of
//! this process. It also refuses `PRAGMA journal_mode = WAL`, which litevfs cannot write. It
//! does not decide anything about pages, leases or commits: it calls [`Database`].

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::config::{self, MAX_PREFETCH_LIMIT, MAX_READAHEAD_LIMIT, format_duration};
use super::database::Database;
use super::error::{Error, Result};
use super::lease::HeldLease;

/// One VFS pragma. Variants with `Option` read the value when `None` and set it when `Some`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pragma {
    /// `PRAGMA litevfs_acquire_lease;`
    AcquireLease,
    /// `PRAGMA litevfs_release_lease;`
    ReleaseLease,
    /// `PRAGMA litevfs_lease;`
    Lease,
    /// `PRAGMA litevfs_position;`
    Position,
    /// `PRAGMA litevfs_sync;`
    Sync,
    /// `PRAGMA litevfs_cache_db;`
    CacheDb,
    /// `PRAGMA litevfs_cache_stats;`
    CacheStats,
    /// `PRAGMA litevfs_last_error;`
    LastError,
    /// `PRAGMA litevfs_cache_sync_period;` or `PRAGMA litevfs_cache_sync_period = '500ms';`
    CacheSyncPeriod(Option<Duration>),
    /// `PRAGMA litevfs_max_cached_pages;` or `PRAGMA litevfs_max_cached_pages = 10000;`
    MaxCachedPages(Option<u64>),
    /// `PRAGMA litevfs_min_available_space;` or `PRAGMA litevfs_min_available_space = '100M';`
    MinAvailableSpace(Option<u64>),
    /// `PRAGMA litevfs_max_reqs_per_query;` or `PRAGMA litevfs_max_reqs_per_query = 100;`
    MaxReqsPerQuery(Option<u32>),
    /// `PRAGMA litevfs_max_prefetch_pages;` or `PRAGMA litevfs_max_prefetch_pages = 64;`
    MaxPrefetchPages(Option<u32>),
    /// `PRAGMA litevfs_max_readahead_bytes;` or `PRAGMA litevfs_max_readahead_bytes = '8M';`
    MaxReadaheadBytes(Option<u64>),
}

fn bad(pragma: &str, value: &str, allowed: &str) -> Error {
    Error::BadPragma {
        pragma: pragma.to_string(),
        value: value.to_string(),
        allowed: allowed.to_string(),
    }
}

fn setting<T>(
    name: &str,
    arg: Option<&str>,
    allowed: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    arg.map(|a| parse(a).ok_or_else(|| bad(name, a, allowed)))
        .transpose()
}

impl Pragma {
    /// `Ok(None)`: not ours, SQLite handles it.
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Option<Pragma>> {
        let name = name.to_ascii_lowercase();
        let action = |p: Pragma| match arg {
            None => Ok(Some(p)),
            Some(a) => Err(bad(&name, a, "no value (this pragma takes none)")),
        };
        const DUR: &str = "a duration such as '500ms', '2s', '1m' or a number of seconds, up to 1 day; 0 turns periodic syncing off";
        match name.as_str() {
            "litevfs_acquire_lease" => action(Pragma::AcquireLease),
            "litevfs_release_lease" => action(Pragma::ReleaseLease),
            "litevfs_lease" => action(Pragma::Lease),
            "litevfs_position" => action(Pragma::Position),
            "litevfs_sync" => action(Pragma::Sync),
            "litevfs_cache_db" => action(Pragma::CacheDb),
            "litevfs_cache_stats" => action(Pragma::CacheStats),
            "litevfs_last_error" => action(Pragma::LastError),
            "litevfs_cache_sync_period" => Ok(Some(Pragma::CacheSyncPeriod(setting(
                &name,
                arg,
                DUR,
                config::parse_duration,
            )?))),
            "litevfs_max_cached_pages" => Ok(Some(Pragma::MaxCachedPages(setting(
                &name,
                arg,
                "a number of pages from 0 (no limit) to 4294967295",
                |a| config::parse_count(a, u32::MAX as u64),
            )?))),
            "litevfs_min_available_space" => Ok(Some(Pragma::MinAvailableSpace(setting(
                &name,
                arg,
                "a number of bytes, optionally with a K, M or G suffix; 0 turns the check off",
                config::parse_bytes,
            )?))),
            "litevfs_max_reqs_per_query" => Ok(Some(Pragma::MaxReqsPerQuery(setting(
                &name,
                arg,
                "a number of requests from 0 (no limit) to 1000000",
                |a| config::parse_count(a, 1_000_000).map(|n| n as u32),
            )?))),
            "litevfs_max_prefetch_pages" => Ok(Some(Pragma::MaxPrefetchPages(setting(
                &name,
                arg,
                &format!("a number of pages from 0 to {MAX_PREFETCH_LIMIT}"),
                |a| config::parse_count(a, MAX_PREFETCH_LIMIT as u64).map(|n| n as u32),
            )?))),
            "litevfs_max_readahead_bytes" => Ok(Some(Pragma::MaxReadaheadBytes(setting(
                &name,
                arg,
                "a number of bytes up to 64M, optionally with a K or M suffix; 0 turns read-ahead growth off",
                |a| config::parse_bytes(a).filter(|n| *n <= MAX_READAHEAD_LIMIT),
            )?))),
            _ => Ok(None),
        }
    }

    /// Runs the pragma; the returned string is its one-row result.
    pub fn eval(self, db: &Database) -> Result<Option<String>> {
        let mut s = db.settings.lock();
        let out = match self {
            Pragma::CacheSyncPeriod(v) => format_duration(set_or_get(&mut s.sync_period, v)),
            Pragma::MinAvailableSpace(v) => set_or_get(&mut s.min_available_space, v).to_string(),
            Pragma::MaxReqsPerQuery(v) => set_or_get(&mut s.max_reqs_per_query, v).to_string(),
            Pragma::MaxPrefetchPages(v) => set_or_get(&mut s.max_prefetch_pages, v).to_string(),
            Pragma::MaxReadaheadBytes(v) => set_or_get(&mut s.max_readahead_bytes, v).to_string(),
            Pragma::MaxCachedPages(v) => {
                let n = set_or_get(&mut s.max_cached_pages, v);
                drop(s);
                db.state.lock().cache.shrink_to(n);
                n.to_string()
            }
            other => {
                drop(s);
                other.eval_action(db)?
            }
        };
        Ok(Some(out))
    }

    fn eval_action(self, db: &Database) -> Result<String> {
        match self {
            Pragma::AcquireLease => db.acquire_lease(),
            Pragma::ReleaseLease => db.release_lease(),
            Pragma::Lease => Ok(HeldLease::describe(db.lease.lock().as_ref())),
            Pragma::Position => Ok(db.state.lock().store_pos().to_string()),
            Pragma::Sync => {
                let mut st = db.state.lock();
                db.sync_locked(&mut st, true)?;
                Ok(st.store_pos().to_string())
            }
            Pragma::CacheDb => db.cache_all().map(|n| n.to_string()),
            Pragma::CacheStats => Ok(stats_json(db)),
            Pragma::LastError => Ok(db.last_error.lock().clone().unwrap_or_default()),
            Pragma::CacheSyncPeriod(_)
            | Pragma::MaxCachedPages(_)
            | Pragma::MinAvailableSpace(_)
            | Pragma::MaxReqsPerQuery(_)
            | Pragma::MaxPrefetchPages(_)
            | Pragma::MaxReadaheadBytes(_) => unreachable!("settings are handled by eval"),
        }
    }
}

/// Sets `slot` when a value is given; returns the value in effect.
fn set_or_get<T: Copy>(slot: &mut T, value: Option<T>) -> T {
    if let Some(v) = value {
        *slot = v;
    }
    *slot
}

fn stats_json(db: &Database) -> String {
    let st = db.state.lock();
    let s = &db.stats;
    serde_json::json!({
        "pages_cached": st.cache.len(),
        "hits": s.hits.load(Relaxed),
        "misses": s.misses.load(Relaxed),
        "requests": s.requests.load(Relaxed),
        "pages_fetched": s.pages_fetched.load(Relaxed),
        "bytes_fetched": s.bytes_fetched.load(Relaxed),
        "commits": s.commits.load(Relaxed),
        "checksums_verified": s.checksums_verified.load(Relaxed),
        "lost_replies": s.lost_replies.load(Relaxed),
        "lost_replies_landed": s.lost_replies_landed.load(Relaxed),
        "lost_replies_failed": s.lost_replies_failed.load(Relaxed),
        "commits_unknown": s.commits_unknown.load(Relaxed),
        "page_size": st.page_size,
        "db_pages": st.size,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_values() {
        assert_eq!(
            Pragma::parse("litevfs_acquire_lease", None).unwrap(),
            Some(Pragma::AcquireLease)
        );
        assert_eq!(
            Pragma::parse("LITEVFS_SYNC", None).unwrap(),
            Some(Pragma::Sync)
        );
        assert_eq!(
            Pragma::parse("litevfs_cache_sync_period", Some("'250ms'")).unwrap(),
            Some(Pragma::CacheSyncPeriod(Some(Duration::from_millis(250))))
        );
        assert_eq!(
            Pragma::parse("litevfs_max_prefetch_pages", Some("64")).unwrap(),
            Some(Pragma::MaxPrefetchPages(Some(64)))
        );
        assert_eq!(Pragma::parse("journal_mode", Some("wal")).unwrap(), None);
        assert_eq!(Pragma::parse("journal_mode", Some("delete")).unwrap(), None);
        assert_eq!(Pragma::parse("page_size", None).unwrap(), None);
    }

    #[test]
    fn bad_values_say_what_is_allowed() {
        let e = Pragma::parse("litevfs_max_prefetch_pages", Some("5000"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("from 0 to 1024"), "{e}");
        let e = Pragma::parse("litevfs_cache_sync_period", Some("soon"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'500ms'"), "{e}");
        assert!(Pragma::parse("litevfs_sync", Some("1")).is_err());
    }
}
