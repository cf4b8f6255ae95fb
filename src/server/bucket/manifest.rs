//! A database's manifest (`c/CLUSTER/DB/manifest`): the JSON object that names its generation,
//! the image and segments a reader opens, where reading commit objects (`l0/`) starts, and the
//! objects retired by compaction. Only compaction, creation and deletion replace it, always by
//! compare-and-swap on its ETag; commits never touch it.
//!
//! Invariant: `base` and `segments` together hold every transaction from TXID 1 (or the base's
//! position) to `next_l0 - 1`, contiguously; commits from `next_l0` on are the objects `l0/N`,
//! each found from the previous one's max TXID + 1.

use serde::{Deserialize, Serialize};

/// Version of the manifest format.
pub const FORMAT: u32 = 1;

/// An object the manifest lists, with what a reader needs to fetch its header and index in one
/// GET (bytes `0..128 + index_len`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjRef {
    /// Key relative to the generation (`img/…`, `seg/…`, `big/…`, `l0/…`).
    pub key: String,
    pub min_txid: u64,
    pub max_txid: u64,
    pub len: u64,
    pub index_len: u64,
    pub page_size: u32,
    pub level: u8,
}

/// An object no longer listed, and when it stopped being listed (ms since the epoch). It is
/// deleted once the retention, the grace and the clock-skew margin have passed since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub key: String,
    pub at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// 16 hex digits; objects live under `c/CLUSTER/DB/GENERATION/`.
    pub generation: String,
    /// A deleted database: its generation's objects are garbage.
    #[serde(default)]
    pub deleted: bool,
    /// The first TXID whose commit is read from `l0/` rather than from `base` or `segments`.
    pub next_l0: u64,
    /// The image the listed segments apply on (`None` until compaction writes one: then the
    /// commit at TXID 1, itself an image, is the base and is read from `l0/`).
    pub base: Option<ObjRef>,
    /// Segments after the base, in TXID order, contiguous.
    #[serde(default)]
    pub segments: Vec<ObjRef>,
    #[serde(default)]
    pub retired: Vec<Retired>,
    /// Generations of earlier incarnations whose objects are still to be deleted (`key` is
    /// the generation, `at_ms` when the database was deleted).
    #[serde(default)]
    pub dead_generations: Vec<Retired>,
    pub updated_ms: u64,
}

impl Manifest {
    /// The manifest of a new, empty database.
    pub fn new(dead_generations: Vec<Retired>) -> Manifest {
        Manifest {
            format: FORMAT,
            generation: format!("{:016x}", super::layout::nonce()),
            deleted: false,
            next_l0: 1,
            base: None,
            segments: Vec::new(),
            retired: Vec::new(),
            dead_generations,
            updated_ms: crate::ltx::now_ms(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest serialises")
    }

    pub fn decode(b: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(b).map_err(|e| format!("invalid manifest: {e}"))?;
        if m.format != FORMAT {
            return Err(format!("unsupported manifest format {}", m.format));
        }
        if m.generation.len() != 16 || !m.generation.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("invalid generation {:?}", m.generation));
        }
        if m.base.is_none() && !m.segments.is_empty() {
            return Err("segments without a base".into());
        }
        let mut next = m.base.as_ref().map_or(1, |b| b.max_txid + 1);
        for s in &m.segments {
            if s.min_txid != next || s.max_txid < s.min_txid {
                return Err(format!("segment {} is not contiguous", s.key));
            }
            next = s.max_txid + 1;
        }
        if m.base.is_some() && m.next_l0 != next {
            return Err(format!(
                "next_l0 {} does not follow the segments",
                m.next_l0
            ));
        }
        Ok(m)
    }

    /// Every object the manifest lists.
    pub fn listed(&self) -> impl Iterator<Item = &ObjRef> {
        self.base.iter().chain(self.segments.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, min: u64, max: u64) -> ObjRef {
        ObjRef {
            key: key.into(),
            min_txid: min,
            max_txid: max,
            len: 1,
            index_len: 1,
            page_size: 4096,
            level: 1,
        }
    }

    #[test]
    fn round_trip_and_contiguity() {
        let mut m = Manifest::new(vec![]);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        m.base = Some(obj("img/a", 1, 4));
        m.segments = vec![obj("seg/b", 5, 9), obj("seg/c", 10, 10)];
        m.next_l0 = 11;
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        m.next_l0 = 12;
        assert!(Manifest::decode(&m.encode()).is_err());
        m.next_l0 = 11;
        m.segments[1].min_txid = 11;
        assert!(Manifest::decode(&m.encode()).is_err());
        assert!(Manifest::decode(b"{}").is_err());
    }
}
