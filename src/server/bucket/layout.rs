//! Object keys of the bucket layout, relative to `PREFIX/v1/` (see docs/server.md, "Running on
//! object storage"):
//!
//! ```text
//! store.json                         the store's identity (random id; cluster ids derive from it)
//! c/CLUSTER/DB/manifest              the database's manifest (JSON, replaced by compare-and-swap)
//! c/CLUSTER/DB/lease                 its write lease (JSON, replaced by compare-and-swap)
//! c/CLUSTER/DB/GEN/l0/MIN            one commit, created only if absent: the commit point
//! c/CLUSTER/DB/GEN/big/MIN-NONCE     the body of a commit too large for one conditional PUT
//! c/CLUSTER/DB/GEN/seg/MIN-MAX-NONCE a segment: consecutive commits merged by compaction
//! c/CLUSTER/DB/GEN/img/TXID-NONCE    an image: the whole database at one position
//! ```
//!
//! `GEN` (16 hex digits) is the database's generation: deleting a database and creating it again
//! starts a new one, so old objects never mix with new ones. TXIDs and nonces are 16 lowercase hex
//! digits. Keys inside a generation are written relative to it (`l0/…`, `seg/…`) in manifests and
//! pointers.

use crate::server::store::DbKey;

/// The store's identity object.
pub const STORE: &str = "store.json";

/// The prefix under which a cluster's databases live.
pub fn cluster(cluster: &str) -> String {
    format!("c/{cluster}")
}

fn db(key: &DbKey) -> String {
    format!("c/{}/{}", key.cluster, key.name)
}

pub fn manifest(key: &DbKey) -> String {
    format!("{}/manifest", db(key))
}

pub fn lease(key: &DbKey) -> String {
    format!("{}/lease", db(key))
}

/// The prefix of one generation of a database.
pub fn generation(key: &DbKey, generation: &str) -> String {
    format!("{}/{generation}", db(key))
}

/// A key inside a generation, as written in manifests and pointers.
pub fn in_generation(key: &DbKey, generation: &str, rel: &str) -> String {
    format!("{}/{rel}", self::generation(key, generation))
}

/// The commit object of the transaction starting at `min_txid`.
pub fn l0(min_txid: u64) -> String {
    format!("l0/{min_txid:016x}")
}

pub fn big(min_txid: u64, nonce: u64) -> String {
    format!("big/{min_txid:016x}-{nonce:016x}")
}

pub fn segment(min_txid: u64, max_txid: u64, nonce: u64) -> String {
    format!("seg/{min_txid:016x}-{max_txid:016x}-{nonce:016x}")
}

pub fn image(txid: u64, nonce: u64) -> String {
    format!("img/{txid:016x}-{nonce:016x}")
}

/// A new random 64-bit nonce or generation id.
pub fn nonce() -> u64 {
    rand::random::<u64>() | 1
}
