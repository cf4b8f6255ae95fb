//! Write leases in the bucket (`c/CLUSTER/DB/lease`), shared by every server on it: taken,
//! renewed and released by compare-and-swap on the object's ETag, so all servers agree on the one
//! holder and a restart keeps them.
//!
//! Each acquisition increments the lease's epoch (a fencing token), which is also the first 16
//! hex digits of the lease id; commits record the epoch they were made under.
//!
//! Clocks: expiry is wall-clock time written by the server that granted or renewed the lease. The
//! holder's commits are accepted while `now < expires`; another client may take the lease only
//! once `now > expires + max_skew`. So two servers whose clocks differ by less than `max_skew`
//! never both consider different holders live. A commit checks the lease just before its
//! conditional create; the create itself serialises commits, so a holder whose lease ran out
//! while its commit was in flight can land that one commit, never two at one position.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Bucket, Cas, layout};
use crate::server::store::lease::check_duration;
use crate::server::store::{DbKey, StoreError, StoreResult};
use crate::wire::Lease;

/// The lease object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseObj {
    id: String,
    epoch: u64,
    expires_ms: u64,
    released: bool,
}

/// Attempts of one lease operation that lost a compare-and-swap race.
const CAS_ATTEMPTS: usize = 8;

/// Leases held in the bucket.
pub struct BucketLeases {
    bucket: Arc<Bucket>,
    max_skew: Duration,
    /// Leases granted or renewed through this server, until they expire: the databases the
    /// poller watches for other servers' commits.
    local: Mutex<HashMap<DbKey, Instant>>,
}

fn now_ms() -> u64 {
    crate::ltx::now_ms()
}

fn wire(obj: &LeaseObj) -> Lease {
    let expires_at =
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(obj.expires_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Lease {
        id: obj.id.clone(),
        expires_at,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl BucketLeases {
    pub fn new(bucket: Arc<Bucket>, max_skew: Duration) -> BucketLeases {
        BucketLeases {
            bucket,
            max_skew,
            local: Mutex::new(HashMap::new()),
        }
    }

    fn read(&self, key: &DbKey) -> StoreResult<Option<(LeaseObj, String)>> {
        let Some(got) = self.bucket.get(&layout::lease(key))? else {
            return Ok(None);
        };
        let obj: LeaseObj = serde_json::from_slice(&got.bytes)
            .map_err(|e| StoreError::Corrupt(format!("lease object of {:?}: {e}", key.name)))?;
        let etag = got.etag.ok_or_else(|| {
            StoreError::Corrupt("the object store returned no ETag for a lease".into())
        })?;
        Ok(Some((obj, etag)))
    }

    /// Live for its holder: commits under it are accepted.
    fn held(obj: &LeaseObj) -> bool {
        !obj.released && now_ms() < obj.expires_ms
    }

    /// Live for everyone else: nobody may take it yet.
    fn taken(&self, obj: &LeaseObj) -> bool {
        !obj.released && now_ms() <= obj.expires_ms + ms(self.max_skew)
    }

    fn write(&self, key: &DbKey, obj: &LeaseObj, etag: Option<&str>) -> StoreResult<bool> {
        let bytes = serde_json::to_vec(obj).expect("a lease serialises");
        let rel = layout::lease(key);
        let r = self.bucket.put_settled(&rel, bytes, etag)?;
        Ok(matches!(r, Cas::Done(_)))
    }

    fn note_local(&self, key: &DbKey, expires_ms: u64) {
        let left = Duration::from_millis(expires_ms.saturating_sub(now_ms()));
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), Instant::now() + left);
    }

    /// Acquires a new lease; `ELEASEEXISTS` while another one is live.
    pub fn acquire(&self, key: &DbKey, d: Duration) -> StoreResult<Lease> {
        let d = check_duration(d)?;
        for _ in 0..CAS_ATTEMPTS {
            let current = self.read(key)?;
            if let Some((obj, _)) = &current
                && self.taken(obj)
            {
                return Err(StoreError::LeaseExists);
            }
            let epoch = current.as_ref().map_or(0, |(o, _)| o.epoch) + 1;
            let obj = LeaseObj {
                id: format!("{epoch:016x}{:016x}", rand::random::<u64>()),
                epoch,
                expires_ms: now_ms() + ms(d),
                released: false,
            };
            if self.write(key, &obj, current.as_ref().map(|(_, e)| e.as_str()))? {
                self.note_local(key, obj.expires_ms);
                return Ok(wire(&obj));
            }
        }
        Err(StoreError::LeaseExists)
    }

    /// The current lease object if `id` holds it, else the error a holder gets.
    fn holding(&self, key: &DbKey, id: &str) -> StoreResult<(LeaseObj, String)> {
        match self.read(key)? {
            Some((obj, etag)) if obj.id == id && Self::held(&obj) => Ok((obj, etag)),
            Some((obj, _)) if obj.id != id && self.taken(&obj) => Err(StoreError::LeaseMismatch),
            _ => Err(StoreError::NoLease),
        }
    }

    /// Extends the live lease `id` to now + `d`; the id stays the same.
    pub fn refresh(&self, key: &DbKey, id: &str, d: Duration) -> StoreResult<Lease> {
        let d = check_duration(d)?;
        for _ in 0..CAS_ATTEMPTS {
            let (mut obj, etag) = self.holding(key, id)?;
            obj.expires_ms = now_ms() + ms(d);
            if self.write(key, &obj, Some(&etag))? {
                self.note_local(key, obj.expires_ms);
                return Ok(wire(&obj));
            }
        }
        Err(StoreError::NoLease)
    }

    /// Releases the live lease `id`.
    pub fn release(&self, key: &DbKey, id: &str) -> StoreResult<()> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut obj, etag) = self.holding(key, id)?;
            obj.released = true;
            if self.write(key, &obj, Some(&etag))? {
                self.local
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(key);
                return Ok(());
            }
        }
        Err(StoreError::NoLease)
    }

    /// May a transaction with this `Lfsc-Lease-Id` (or none) write to `key` now? Returns the
    /// lease's epoch (0 without a lease). Reads the lease object every time: the lease may have
    /// changed hands through another server.
    pub fn check_write(&self, key: &DbKey, id: Option<&str>) -> StoreResult<u64> {
        match id {
            Some(id) => self.holding(key, id).map(|(obj, _)| obj.epoch),
            None => match self.read(key)? {
                Some((obj, _)) if self.taken(&obj) => Err(StoreError::LeaseExists),
                _ => Ok(0),
            },
        }
    }

    /// Ends any lease on a deleted database (the epoch is kept, so it still only grows), by
    /// compare-and-swap: a lease taken meanwhile through another server is ended too, never
    /// replaced by an older one.
    pub fn remove(&self, key: &DbKey) -> StoreResult<()> {
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut obj, etag)) = self.read(key)? else {
                return Ok(());
            };
            if obj.released {
                return Ok(());
            }
            obj.released = true;
            if self.write(key, &obj, Some(&etag))? {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(format!(
            "the lease of {:?} keeps changing",
            key.name
        )))
    }

    /// Databases with a lease granted or renewed through this server that has not expired.
    pub fn active(&self) -> Vec<DbKey> {
        let now = Instant::now();
        let mut map = self.local.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, until| *until > now);
        map.keys().cloned().collect()
    }
}
