//! Errors of the VFS and their one mapping to SQLite result codes.
//!
//! Owns [`Error`], the error every VFS module returns across its boundary, and [`Error::code`],
//! the single exhaustive (wildcard-free) mapping to SQLite result codes. Adding a variant
//! anywhere forces a decision here. It does not log or remember errors: [`super::report`] does.

use sqlite_plugin::vars;

use super::cache::CacheError;
use super::client::ClientError;
use super::spill::SpillError;
use crate::ltx::LtxError;
use crate::wire::{ErrorCode, Pos};

/// Extended result code for "the page store can no longer serve the position this transaction
/// reads" (`EPOSMISMATCH` on a page fetch): `SQLITE_IOERR | (0x504F53 << 8)`, the same value the
/// original LiteVFS used. The statement fails; the next transaction starts at the new position.
pub const LITEVFS_IOERR_POS_MISMATCH: i32 = vars::SQLITE_IOERR | (0x504F53 << 8);

/// Extended result code for "the reply to this commit was lost and the page store stayed
/// unreachable until `LITEVFS_COMMIT_DEADLINE`: the transaction may or may not be in the store":
/// `SQLITE_IOERR | (0x554E4B << 8)` ("UNK").
pub const LITEVFS_IOERR_COMMIT_UNKNOWN: i32 = vars::SQLITE_IOERR | (0x554E4B << 8);

/// Extended result code for "this query needed more remote requests than
/// `litevfs_max_reqs_per_query` allows": `SQLITE_ABORT | (0x524551 << 8)` ("REQ").
pub const LITEVFS_ABORT_TOO_MANY_REQUESTS: i32 = vars::SQLITE_ABORT | (0x524551 << 8);

/// What the VFS was doing when an error happened; picks the I/O error flavour.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Open,
    Read,
    Write,
    Lock,
    Commit,
    Pragma,
}

/// Every failure the VFS reports to SQLite.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("database {name:?} does not exist in the page store at {host}")]
    NoSuchDatabase { name: String, host: String },
    #[error(
        "invalid database name {name:?}: {why}; open file:NAME?vfs=litevfs where NAME is 1-256 \
         characters from [A-Za-z0-9_.-], not starting with '.', never a path"
    )]
    BadName { name: String, why: String },
    #[error(
        "database {0:?}: writing needs the write lease; run PRAGMA litevfs_acquire_lease first"
    )]
    NoLease(String),
    #[error("database {db:?}: cannot take the write lease: {why}")]
    LeaseBusy { db: String, why: String },
    #[error(
        "database {db:?} changed in the page store under this transaction (the store is at {pos}); \
         the transaction failed, retry it"
    )]
    RemoteChanged { db: String, pos: Pos },
    #[error(
        "database {db:?}: this query needed more than {limit} remote requests \
         (litevfs_max_reqs_per_query); raise the limit or load the database with PRAGMA litevfs_cache_db"
    )]
    TooManyRequests { db: String, limit: u32 },
    #[error(
        "database {db:?}: the outcome of this commit (position {pos}) is unknown: its reply was \
         lost and the page store did not answer within LITEVFS_COMMIT_DEADLINE ({}s); the \
         transaction may be in the store: look before retrying it (last error: {last})",
        deadline.as_secs()
    )]
    CommitUnknown {
        db: String,
        pos: Pos,
        deadline: std::time::Duration,
        last: Box<ClientError>,
    },
    #[error(
        "database {db:?}: the outcome of the last commit (position {pos}) is still unknown and the \
         page store does not answer: transactions wait until it does ({why})"
    )]
    Unsettled { db: String, pos: Pos, why: String },
    #[error("database {db:?}: page {pgno} from the page store failed verification: {why}")]
    BadPage { db: String, pgno: u32, why: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("building the LTX of a commit: {0}")]
    Ltx(#[from] LtxError),
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("bad value {value:?} for PRAGMA {pragma}: allowed are {allowed}")]
    BadPragma {
        pragma: String,
        value: String,
        allowed: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("a lock held by another connection of this process")]
    Busy,
    #[error("internal error (panic) in litevfs: {0}")]
    Panic(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The SQLite result code for this error when it happens during `op`.
    pub fn code(&self, op: Op) -> i32 {
        match self {
            Error::Client(e) => client_code(e, op),
            Error::NoSuchDatabase { .. } | Error::BadName { .. } => vars::SQLITE_CANTOPEN,
            Error::NoLease(_) => vars::SQLITE_READONLY,
            Error::LeaseBusy { .. } | Error::Busy => vars::SQLITE_BUSY,
            Error::RemoteChanged { .. } => LITEVFS_IOERR_POS_MISMATCH,
            Error::CommitUnknown { .. } | Error::Unsettled { .. } => LITEVFS_IOERR_COMMIT_UNKNOWN,
            Error::TooManyRequests { .. } => LITEVFS_ABORT_TOO_MANY_REQUESTS,
            Error::BadPage { .. } => vars::SQLITE_IOERR_READ,
            Error::Spill(e) if e.is_full() => vars::SQLITE_FULL,
            Error::Ltx(LtxError::Io(e))
                if SpillError::inside(e).is_some_and(SpillError::is_full) =>
            {
                vars::SQLITE_FULL
            }
            Error::Cache(_) | Error::Ltx(_) | Error::Spill(_) | Error::Panic(_) => io_code(op),
            Error::BadPragma { .. } | Error::Unsupported(_) => vars::SQLITE_ERROR,
        }
    }

    /// Whether this error is routine (lock contention) and not worth a log line.
    pub fn is_quiet(&self) -> bool {
        matches!(self, Error::Busy)
    }
}

fn client_code(e: &ClientError, op: Op) -> i32 {
    match e {
        ClientError::Unauthorized { .. } => vars::SQLITE_AUTH,
        ClientError::PosMismatch { .. } => match op {
            Op::Read => LITEVFS_IOERR_POS_MISMATCH,
            Op::Open | Op::Write | Op::Lock | Op::Commit => vars::SQLITE_BUSY_SNAPSHOT,
            Op::Pragma => vars::SQLITE_BUSY,
        },
        // A write refused because the lease is gone: as writing without it.
        ClientError::Api { .. }
            if matches!(
                e.api_code(),
                Some(ErrorCode::NoLease | ErrorCode::LeaseMismatch)
            ) && matches!(op, Op::Write | Op::Commit) =>
        {
            vars::SQLITE_READONLY
        }
        // A commit larger than the store's --max-body-size: a capacity limit, not an I/O fault.
        ClientError::Api { .. }
            if e.api_code() == Some(ErrorCode::TooLarge)
                && matches!(op, Op::Write | Op::Commit) =>
        {
            vars::SQLITE_FULL
        }
        ClientError::Unreachable { .. }
        | ClientError::Api { .. }
        | ClientError::BadResponse { .. } => io_code(op),
    }
}

fn io_code(op: Op) -> i32 {
    match op {
        Op::Open => vars::SQLITE_CANTOPEN,
        Op::Read => vars::SQLITE_IOERR_READ,
        Op::Write => vars::SQLITE_IOERR_WRITE,
        Op::Lock => vars::SQLITE_IOERR_LOCK,
        Op::Commit => vars::SQLITE_IOERR_FSYNC,
        Op::Pragma => vars::SQLITE_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_codes() {
        assert_eq!(LITEVFS_IOERR_POS_MISMATCH, 0x504F530A);
        assert_eq!(LITEVFS_IOERR_POS_MISMATCH & 0xff, vars::SQLITE_IOERR);
        assert_eq!(LITEVFS_ABORT_TOO_MANY_REQUESTS & 0xff, vars::SQLITE_ABORT);
        assert_eq!(LITEVFS_IOERR_COMMIT_UNKNOWN, 0x554E4B0A);
        assert_eq!(LITEVFS_IOERR_COMMIT_UNKNOWN & 0xff, vars::SQLITE_IOERR);
        let lost = Error::Client(ClientError::Api {
            host: "h".into(),
            status: 409,
            code: ErrorCode::LeaseMismatch.as_str().into(),
            message: "lease expired".into(),
        });
        assert_eq!(lost.code(Op::Commit), vars::SQLITE_READONLY);
        assert_eq!(lost.code(Op::Read), vars::SQLITE_IOERR_READ);
        let e = Error::RemoteChanged {
            db: "x".into(),
            pos: Pos::new(2, 1 << 63),
        };
        assert_eq!(e.code(Op::Read), LITEVFS_IOERR_POS_MISMATCH);
        assert_eq!(
            Error::NoLease("x".into()).code(Op::Lock),
            vars::SQLITE_READONLY
        );
    }
}
