//! Shipping a commit so that its outcome is never ambiguous.
//!
//! A `POST /db/tx` whose reply is lost (connection reset, timeout, a store that restarts or
//! answers 5xx) may or may not have landed. [`Database::ship`] then asks the store whether the
//! position the LTX produces (its TXID with its post-apply checksum) exists, and while the store
//! is still at the pre-apply position it sends the same file again. The store applies a file
//! only on top of its pre-apply position, so of the original and its copies exactly one can
//! land, whichever reaches the store first; a copy that arrives after it gets `EPOSMISMATCH` and
//! the next question finds the position. The answer is therefore success exactly when the
//! transaction is in the store, failure exactly when it is not and can no longer get there
//! (the store moved elsewhere, or refused the lease, which also fences any copy still in
//! flight), and [`Error::CommitUnknown`] only when the store stays unreachable until
//! `LITEVFS_COMMIT_DEADLINE` passes.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::client::ClientError;
use super::database::Database;
use super::error::{Error, Result};
use super::spill::SpillBuf;
use crate::wire::{ErrorCode, Pos};

/// First pause between questions while the store does not answer; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Whether the store has the position a commit produces.
#[derive(Debug, PartialEq, Eq)]
enum Landed {
    Yes,
    /// The store is still at the pre-apply position.
    No,
    /// The store is somewhere else: the commit can never land.
    Elsewhere(Pos),
}

/// Whether a failed request may have been carried out: no reply, a garbled reply, or a 5xx.
pub fn ambiguous(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. } | ClientError::BadResponse { .. } => true,
        ClientError::Api { status, .. } => *status >= 500,
        ClientError::Unauthorized { .. } | ClientError::PosMismatch { .. } => false,
    }
}

impl Database {
    /// Uploads the LTX that takes the database from `base` to `after` under `lease_id`.
    /// `Ok` when, and only when, the store holds `after`.
    pub(super) fn ship(&self, base: Pos, after: Pos, lease_id: &str, ltx: &SpillBuf) -> Result<()> {
        let first = match self.client.write_tx(&self.name, lease_id, ltx) {
            Ok(()) => return Ok(()),
            Err(e) if !ambiguous(&e) => return Err(e.into()),
            Err(e) => e,
        };
        self.stats.lost_replies.fetch_add(1, Relaxed);
        tracing::warn!(
            db = %self.name,
            "no answer to the commit of {after}: {first}; finding out whether it landed"
        );
        let deadline = Instant::now() + self.client.commit_deadline();
        let mut pause = FIRST_PAUSE;
        let mut last = first;
        loop {
            if Instant::now() >= deadline {
                return Err(self.unknown(after, last));
            }
            match self.landed(base, after) {
                Ok(Landed::Yes) => return self.settled_landed(after),
                Ok(Landed::Elsewhere(pos)) => {
                    self.resolved(after, false);
                    return Err(ClientError::PosMismatch {
                        host: self.client.host().to_string(),
                        pos,
                    }
                    .into());
                }
                Ok(Landed::No) => {
                    match self.client.write_tx(&self.name, lease_id, ltx) {
                        Ok(()) => return self.settled_landed(after),
                        // The original (or an earlier copy) got there first, or the store moved:
                        // ask again at once.
                        Err(ClientError::PosMismatch { .. }) => continue,
                        Err(e) if ambiguous(&e) => last = e,
                        Err(refused) => {
                            // Refused outright (the lease expired or the store restarted and forgot
                            // it): a copy still in flight carries the same lease and is refused too,
                            // so one more answer settles it.
                            match self.landed(base, after) {
                                Ok(Landed::Yes) => return self.settled_landed(after),
                                Ok(_) => {
                                    self.resolved(after, false);
                                    return Err(refused.into());
                                }
                                Err(e) => last = e,
                            }
                        }
                    }
                }
                Err(e) if ambiguous(&e) => last = e,
                Err(e) => return Err(self.unknown(after, e)),
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Asks the store for page 1 at `after`: served only if that TXID has that checksum.
    fn landed(&self, base: Pos, after: Pos) -> std::result::Result<Landed, ClientError> {
        self.stats.requests.fetch_add(1, Relaxed);
        match self.client.pages(&self.name, Some(after), &[1]) {
            Ok(_) => Ok(Landed::Yes),
            Err(ClientError::PosMismatch { pos, .. }) if pos == base => Ok(Landed::No),
            Err(ClientError::PosMismatch { pos, .. }) => Ok(Landed::Elsewhere(pos)),
            Err(e) if base.is_zero() && e.api_code() == Some(ErrorCode::NoDb) => Ok(Landed::No),
            Err(e) => Err(e),
        }
    }

    fn settled_landed(&self, after: Pos) -> Result<()> {
        self.resolved(after, true);
        Ok(())
    }

    fn resolved(&self, after: Pos, landed: bool) {
        let (counter, what) = if landed {
            (&self.stats.lost_replies_landed, "it landed: committed")
        } else {
            (&self.stats.lost_replies_failed, "it did not land: failed")
        };
        counter.fetch_add(1, Relaxed);
        tracing::warn!(db = %self.name, "commit of {after}: {what}");
    }

    fn unknown(&self, after: Pos, last: ClientError) -> Error {
        self.stats.commits_unknown.fetch_add(1, Relaxed);
        Error::CommitUnknown {
            db: self.name.clone(),
            pos: after,
            deadline: self.client.commit_deadline(),
            last: Box::new(last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_counts_as_ambiguous() {
        let host = "http://127.0.0.1:1".to_string();
        let api = |status| ClientError::Api {
            host: host.clone(),
            status,
            code: "X".into(),
            message: String::new(),
        };
        assert!(ambiguous(&ClientError::Unreachable {
            host: host.clone(),
            detail: "reset".into()
        }));
        assert!(ambiguous(&api(503)));
        assert!(ambiguous(&api(500)));
        assert!(!ambiguous(&api(400)));
        assert!(!ambiguous(&api(409)));
        assert!(!ambiguous(&ClientError::PosMismatch {
            host,
            pos: Pos::ZERO
        }));
    }
}
