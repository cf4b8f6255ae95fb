//! Write leases: taking, refreshing in the background, and giving back.
//!
//! Owns [`HeldLease`] (a lease as a value: id, owner database, local expiry) and the threads
//! that keep held leases alive: one holder per held lease, which refreshes it with `hold`
//! ([`HOLD`]): the store refreshes at once and keeps the request open for that long, and if the
//! connection closes meanwhile (this process died: the kernel closes its sockets) the store
//! releases the lease there and then, so the next writer waits milliseconds, not the lease.
//! Invariant: a lease is used for a commit only while [`HeldLease::is_live`] says its expiry,
//! measured on this host's monotonic clock from before the request was sent, is ahead by a
//! safety margin. A refresh the store refuses drops the lease. It does not decide what a write
//! needs; [`super::database`] checks the lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::ClientError;
use super::database::Database;
use super::error::{Error, Result};
use crate::wire::ErrorCode;

/// Lease duration asked of the store.
pub const LEASE_DURATION: Duration = Duration::from_secs(5);
/// How long the store holds each refresh of the holder thread.
pub const HOLD: Duration = Duration::from_secs(1);
/// A writer refreshes the lease itself when less than this remains (its holder is late).
const REFRESH_WHEN_LEFT: Duration = Duration::from_millis(2000);
/// A lease is not used for a commit when less than this remains.
const SAFETY_MARGIN: Duration = Duration::from_millis(500);

/// A write lease this process holds on one database.
#[derive(Clone, Debug)]
pub struct HeldLease {
    pub db: String,
    pub id: String,
    /// Local estimate of expiry: request start + granted duration.
    pub expires: Instant,
    /// The store's expiry, as it said.
    pub expires_at: time::OffsetDateTime,
}

impl HeldLease {
    pub fn is_live(&self) -> bool {
        Instant::now() + SAFETY_MARGIN < self.expires
    }

    /// The store granted `LEASE_DURATION`; counting it from before the request was sent, on
    /// this host's monotonic clock, is conservative and immune to clock skew between hosts.
    fn from_wire(db: &str, started: Instant, lease: crate::wire::Lease) -> HeldLease {
        HeldLease {
            db: db.to_string(),
            id: lease.id,
            expires: started + LEASE_DURATION,
            expires_at: lease.expires_at,
        }
    }

    /// `{"held":true,"id":…,"expires_at":…}` as `PRAGMA litevfs_lease` shows it.
    pub fn describe(lease: Option<&HeldLease>) -> String {
        match lease.filter(|l| l.is_live()) {
            None => r#"{"held":false}"#.to_string(),
            Some(l) => {
                let at = l
                    .expires_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                format!(r#"{{"held":true,"id":{:?},"expires_at":"{at}"}}"#, l.id)
            }
        }
    }
}

impl Database {
    /// `PRAGMA litevfs_acquire_lease`: takes the lease (or keeps ours), then brings the
    /// database to the store's latest position.
    pub fn acquire_lease(&self) -> Result<String> {
        let held = self.lease.lock().clone().filter(HeldLease::is_live);
        let started = Instant::now();
        let refreshed = held.map(|h| self.client.lease(&self.name, Some(&h.id), LEASE_DURATION));
        let lease = match refreshed {
            Some(Ok(l)) => Ok(l),
            // Ours is gone (expired, or the store restarted): take a new one.
            Some(Err(e))
                if !matches!(
                    e.api_code(),
                    Some(ErrorCode::NoLease | ErrorCode::LeaseMismatch)
                ) =>
            {
                Err(e)
            }
            _ => self.client.lease(&self.name, None, LEASE_DURATION),
        }
        .map_err(|e| self.lease_error(e))?;
        let lease = HeldLease::from_wire(&self.name, started, lease);
        *self.lease.lock() = Some(lease.clone());
        let mut st = self.state.lock();
        self.sync_locked(&mut st, true)?;
        if !st.idle() && st.pending.is_some() {
            tracing::info!(db = %self.name, "lease taken; newer changes wait for this connection's transaction to end");
        }
        Ok(HeldLease::describe(Some(&lease)))
    }

    fn lease_error(&self, e: ClientError) -> Error {
        match e.api_code() {
            Some(ErrorCode::LeaseExists) => Error::LeaseBusy {
                db: self.name.clone(),
                why: format!("another client holds the write lease ({e})"),
            },
            _ => Error::Client(e),
        }
    }

    /// `PRAGMA litevfs_release_lease`: gives the lease back. Refused inside a write transaction.
    pub fn release_lease(&self) -> Result<String> {
        if self.reserved() {
            return Err(Error::Unsupported(format!(
                "database {:?}: cannot release the write lease inside a write transaction",
                self.name
            )));
        }
        let Some(lease) = self.lease.lock().take() else {
            return Ok(HeldLease::describe(None));
        };
        if let Err(e) = self.client.release_lease(&self.name, &lease.id) {
            // The lease expires on its own; a release the store did not see only delays others.
            tracing::warn!(db = %self.name, "releasing the write lease: {e}");
        }
        Ok(HeldLease::describe(None))
    }

    /// Refreshes the lease when it is due; drops it when the store refuses.
    pub fn refresh_lease(&self) {
        let Some(held) = self.lease.lock().clone() else {
            return;
        };
        if held.expires.saturating_duration_since(Instant::now()) > REFRESH_WHEN_LEFT {
            return;
        }
        let started = Instant::now();
        match self
            .client
            .lease(&self.name, Some(&held.id), LEASE_DURATION)
        {
            Ok(l) => *self.lease.lock() = Some(HeldLease::from_wire(&self.name, started, l)),
            Err(e @ (ClientError::Unreachable { .. } | ClientError::BadResponse { .. })) => {
                if !held.is_live() {
                    self.drop_lease(&held, &e.to_string());
                }
            }
            Err(e) => self.drop_lease(&held, &e.to_string()),
        }
    }

    fn drop_lease(&self, held: &HeldLease, why: &str) {
        let mut lease = self.lease.lock();
        if lease.as_ref().is_some_and(|l| l.id == held.id) {
            *lease = None;
            let msg = format!("database {:?}: lost the write lease: {why}", self.name);
            tracing::warn!("{msg}");
            self.set_error(&msg);
        }
    }
}

/// Runs forever: starts a holder thread for every held lease that has none.
pub fn refresher(databases: impl Fn() -> Vec<Arc<Database>>) {
    use std::sync::atomic::Ordering::SeqCst;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        for db in databases() {
            let held = db.lease.lock().is_some();
            if held && !db.holding.swap(true, SeqCst) {
                let d = db.clone();
                let spawned = std::thread::Builder::new()
                    .name("litevfs-lease-hold".into())
                    .spawn(move || {
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hold(&d)));
                        d.holding.store(false, SeqCst);
                    });
                if spawned.is_err() {
                    db.holding.store(false, SeqCst);
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        db.refresh_lease()
                    }));
                }
            }
        }
    }
}

/// Keeps `db`'s lease with held refreshes until it is dropped or released.
fn hold(db: &Database) {
    loop {
        let Some(held) = db.lease.lock().clone() else {
            return;
        };
        let started = Instant::now();
        match db
            .client
            .hold_lease(&db.name, &held.id, LEASE_DURATION, HOLD)
        {
            Ok(l) => {
                let mut lease = db.lease.lock();
                // Released (or replaced) meanwhile: leave it so.
                if lease.as_ref().is_some_and(|x| x.id == held.id) {
                    *lease = Some(HeldLease::from_wire(&db.name, started, l));
                }
            }
            Err(e @ (ClientError::Unreachable { .. } | ClientError::BadResponse { .. })) => {
                if !held.is_live() {
                    db.drop_lease(&held, &e.to_string());
                }
            }
            Err(e) if e.api_code().is_some_and(|c| c.status() >= 500) => {
                if !held.is_live() {
                    db.drop_lease(&held, &e.to_string());
                }
            }
            Err(e) => db.drop_lease(&held, &e.to_string()),
        }
        // A store that does not hold (or failed at once) must not be asked in a tight loop.
        let spent = started.elapsed();
        if spent < HOLD / 2 {
            std::thread::sleep(HOLD - spent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(left: Duration) -> HeldLease {
        HeldLease {
            db: "d".into(),
            id: "abc".into(),
            expires: Instant::now() + left,
            expires_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_lease_is_used_only_well_before_it_expires() {
        assert!(lease(Duration::from_secs(5)).is_live());
        assert!(!lease(SAFETY_MARGIN / 2).is_live());
        assert!(
            HeldLease::describe(Some(&lease(Duration::from_secs(5))))
                .starts_with(r#"{"held":true,"id":"abc""#)
        );
        assert_eq!(
            HeldLease::describe(Some(&lease(Duration::ZERO))),
            r#"{"held":false}"#
        );
    }
}
