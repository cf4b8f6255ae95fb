//! Write leases (spec 2.7): at most one live lease per database, with an owner id and expiry.
//!
//! Leases live in memory only: a restart drops them all, after which their holders get
//! `ENOLEASE` and must acquire again (safe: nobody else can have been refused meanwhile).
//! Expiry uses the monotonic clock; `expires_at` is the wall-clock rendering for clients.
//! This module does not know about transactions; [`Leases::check_write`] is the only hook the
//! write path uses.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::{DbKey, StoreError, StoreResult};
use crate::wire::Lease;

/// Shortest lease a client may ask for.
pub const MIN_LEASE: Duration = Duration::from_millis(100);
/// Longest lease a client may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(600);
/// Duration used when the request names none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(1);

/// What a lease operation did, for metrics.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Acquired,
    Refreshed,
    Released,
    Conflict,
    Missing,
    Mismatch,
}

impl LeaseEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseEvent::Acquired => "acquire",
            LeaseEvent::Refreshed => "refresh",
            LeaseEvent::Released => "release",
            LeaseEvent::Conflict => "conflict",
            LeaseEvent::Missing => "missing",
            LeaseEvent::Mismatch => "mismatch",
        }
    }

    /// The event a refused operation counts as.
    pub fn of_error(e: &StoreError) -> Option<LeaseEvent> {
        match e {
            StoreError::LeaseExists => Some(LeaseEvent::Conflict),
            StoreError::NoLease => Some(LeaseEvent::Missing),
            StoreError::LeaseMismatch => Some(LeaseEvent::Mismatch),
            _ => None,
        }
    }
}

struct Held {
    id: String,
    expires: Instant,
    expires_at: OffsetDateTime,
}

impl Held {
    fn live(&self, now: Instant) -> bool {
        self.expires > now
    }

    fn lease(&self) -> Lease {
        Lease {
            id: self.id.clone(),
            expires_at: self.expires_at,
        }
    }
}

/// The lease table.
#[derive(Default)]
pub struct Leases {
    held: Mutex<HashMap<DbKey, Held>>,
}

/// Checks a requested duration against [`MIN_LEASE`]..=[`MAX_LEASE`].
pub fn check_duration(d: Duration) -> StoreResult<Duration> {
    if d < MIN_LEASE || d > MAX_LEASE {
        return Err(StoreError::BadInput(format!(
            "lease duration {}ms out of range {}..={}ms",
            d.as_millis(),
            MIN_LEASE.as_millis(),
            MAX_LEASE.as_millis()
        )));
    }
    Ok(d)
}

fn new_held(id: String, d: Duration) -> Held {
    Held {
        id,
        expires: Instant::now() + d,
        expires_at: OffsetDateTime::now_utc() + d,
    }
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<DbKey, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Acquires a new lease; `ELEASEEXISTS` while another one is live.
    pub fn acquire(&self, key: &DbKey, d: Duration) -> StoreResult<Lease> {
        let d = check_duration(d)?;
        let mut map = self.map();
        if map.get(key).is_some_and(|h| h.live(Instant::now())) {
            return Err(StoreError::LeaseExists);
        }
        let held = new_held(
            format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ),
            d,
        );
        let lease = held.lease();
        map.insert(key.clone(), held);
        Ok(lease)
    }

    /// Extends the live lease `id` by `d` from now; the id stays the same.
    pub fn refresh(&self, key: &DbKey, id: &str, d: Duration) -> StoreResult<Lease> {
        let d = check_duration(d)?;
        let mut map = self.map();
        live_matching(&map, key, id)?;
        let held = new_held(id.to_string(), d);
        let lease = held.lease();
        map.insert(key.clone(), held);
        Ok(lease)
    }

    /// Releases the live lease `id`.
    pub fn release(&self, key: &DbKey, id: &str) -> StoreResult<()> {
        let mut map = self.map();
        live_matching(&map, key, id)?;
        map.remove(key);
        Ok(())
    }

    /// May a transaction with this `Lfsc-Lease-Id` (or none) write to `key` now?
    /// With an id: it must be the live lease (`ENOLEASE`/`ELEASEMISMATCH`). Without: refused with
    /// `ELEASEEXISTS` while someone holds a live lease.
    pub fn check_write(&self, key: &DbKey, id: Option<&str>) -> StoreResult<()> {
        let map = self.map();
        match id {
            Some(id) => live_matching(&map, key, id),
            None if map.get(key).is_some_and(|h| h.live(Instant::now())) => {
                Err(StoreError::LeaseExists)
            }
            None => Ok(()),
        }
    }

    pub(super) fn remove(&self, key: &DbKey) {
        self.map().remove(key);
    }
}

fn live_matching(map: &HashMap<DbKey, Held>, key: &DbKey, id: &str) -> StoreResult<()> {
    match map.get(key) {
        Some(h) if h.live(Instant::now()) && h.id == id => Ok(()),
        Some(h) if h.live(Instant::now()) => Err(StoreError::LeaseMismatch),
        _ => Err(StoreError::NoLease),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DbKey {
        DbKey {
            cluster: "default".into(),
            name: "db".into(),
        }
    }

    #[test]
    fn one_live_lease() {
        let l = Leases::default();
        let a = l.acquire(&key(), DEFAULT_LEASE).unwrap();
        assert!(matches!(
            l.acquire(&key(), DEFAULT_LEASE),
            Err(StoreError::LeaseExists)
        ));
        assert!(matches!(
            l.check_write(&key(), None),
            Err(StoreError::LeaseExists)
        ));
        assert!(matches!(
            l.check_write(&key(), Some("x")),
            Err(StoreError::LeaseMismatch)
        ));
        l.check_write(&key(), Some(&a.id)).unwrap();
        assert_eq!(l.refresh(&key(), &a.id, DEFAULT_LEASE).unwrap().id, a.id);
        l.release(&key(), &a.id).unwrap();
        assert!(matches!(l.release(&key(), &a.id), Err(StoreError::NoLease)));
        l.check_write(&key(), None).unwrap();
    }

    #[test]
    fn expired_lease_is_free() {
        let l = Leases::default();
        let a = l.acquire(&key(), MIN_LEASE).unwrap();
        std::thread::sleep(MIN_LEASE * 2);
        assert!(matches!(
            l.check_write(&key(), Some(&a.id)),
            Err(StoreError::NoLease)
        ));
        l.acquire(&key(), DEFAULT_LEASE).unwrap();
    }

    #[test]
    fn duration_bounds() {
        assert!(check_duration(Duration::from_millis(99)).is_err());
        assert!(check_duration(Duration::from_secs(601)).is_err());
        assert!(check_duration(Duration::from_secs(1)).is_ok());
    }
}
