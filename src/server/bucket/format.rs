//! The object format of the bucket ("LVS1"): one object holds the page versions of one or more
//! consecutive transactions of one database, with an index in front so that any page is one
//! byte-range GET once the index is known.
//!
//! ```text
//! header   128 bytes (fixed; big-endian integers)
//!   0  magic "LVS1"            4  version u16 = 1      6  kind u8      7  level u8
//!   8  page size u32          12  transactions T u32  16  slots N u64
//!  24  min TXID u64           32  max TXID u64        40  created (ms since epoch) u64
//!  48  writer nonce u64       56  lease epoch u64     64  index offset u64 (= 128)
//!  72  index length u64       80  data offset u64     88  object length u64
//!  96  reserved (24 zero bytes)                      120  CRC-64 of bytes 0..120
//! index    at the index offset: T transaction records, N slot entries, CRC-64 of both
//!   transaction record (64 bytes): min TXID u64, max TXID u64, page size u32, commit u32,
//!     timestamp u64, pre-apply u64, post-apply u64, created u64, first slot u64
//!   slot entry: kind PAGES: page number u32 + page checksum u64 (12 bytes)
//!               kind IMAGE: page checksum u64 (8 bytes); slot k is the k-th page of
//!               1..=commit, the lock page skipped
//! data     at the data offset: N pages of page-size bytes, slot order
//! ```
//!
//! Kinds: PAGES (a commit, or a segment concatenating commits: every version of every
//! transaction, each transaction's slots in page order), IMAGE (a whole database at one
//! position), POINTER (a commit too large for one conditional PUT: after the index, the key of
//! the PAGES or IMAGE object that holds it). CRC-64 is LTX's (GO-ISO). Checksums are LTX page
//! checksums, so every page read back is verified against its index entry.

use crate::ltx::{CRC64, lock_page};

pub const MAGIC: &[u8; 4] = b"LVS1";
pub const VERSION: u16 = 1;
pub const HEADER_SIZE: usize = 128;
pub const TXN_RECORD_SIZE: usize = 64;
/// Bytes fetched by the first GET of an object whose size is unknown: enough for the header and
/// the index of any commit of up to a few thousand pages.
pub const FIRST_READ: u64 = 256 << 10;

/// What an object holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Pages,
    Image,
    Pointer,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Pages => 1,
            Kind::Image => 2,
            Kind::Pointer => 3,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::Pages),
            2 => Some(Kind::Image),
            3 => Some(Kind::Pointer),
            _ => None,
        }
    }

    /// Bytes of one slot entry in the index.
    pub fn entry_size(self) -> usize {
        match self {
            Kind::Pages => 12,
            Kind::Image => 8,
            Kind::Pointer => 0,
        }
    }
}

/// Why bytes are not a valid object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("object is truncated ({0})")]
    Truncated(&'static str),
    #[error("not a litevfs object (bad magic)")]
    Magic,
    #[error("unsupported object version {0}")]
    Version(u16),
    #[error("unknown object kind {0}")]
    Kind(u8),
    #[error("{0} checksum mismatch")]
    Checksum(&'static str),
    #[error("invalid object: {0}")]
    Invalid(String),
}

/// The fixed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// Compaction level: 0 for commits, 1.. for segments, 0 for images.
    pub level: u8,
    pub page_size: u32,
    pub txns: u32,
    pub slots: u64,
    pub min_txid: u64,
    pub max_txid: u64,
    pub created_ms: u64,
    pub nonce: u64,
    pub lease_epoch: u64,
    pub index_len: u64,
    pub data_offset: u64,
    pub len: u64,
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

impl Header {
    /// A header for `kind` with `txns` transactions and `slots` slots; offsets and lengths are
    /// computed (`extra` is the pointer key's length for POINTER objects).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Kind,
        level: u8,
        page_size: u32,
        txns: u32,
        slots: u64,
        (min_txid, max_txid): (u64, u64),
        nonce: u64,
        lease_epoch: u64,
        extra: u64,
    ) -> Header {
        let index_len = index_len(kind, txns, slots);
        let data_offset = HEADER_SIZE as u64 + index_len;
        let len = match kind {
            Kind::Pointer => data_offset + extra,
            _ => data_offset + slots * u64::from(page_size),
        };
        Header {
            kind,
            level,
            page_size,
            txns,
            slots,
            min_txid,
            max_txid,
            created_ms: crate::ltx::now_ms(),
            nonce,
            lease_epoch,
            index_len,
            data_offset,
            len,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_be_bytes());
        b[6] = self.kind.code();
        b[7] = self.level;
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.txns.to_be_bytes());
        let fields = [
            (16, self.slots),
            (24, self.min_txid),
            (32, self.max_txid),
            (40, self.created_ms),
            (48, self.nonce),
            (56, self.lease_epoch),
            (64, HEADER_SIZE as u64),
            (72, self.index_len),
            (80, self.data_offset),
            (88, self.len),
        ];
        for (o, v) in fields {
            b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        }
        let crc = CRC64.checksum(&b[..120]);
        b[120..128].copy_from_slice(&crc.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::Truncated("header"));
        }
        if &b[0..4] != MAGIC {
            return Err(FormatError::Magic);
        }
        if CRC64.checksum(&b[..120]) != be64(b, 120) {
            return Err(FormatError::Checksum("header"));
        }
        let version = u16::from_be_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let kind = Kind::from_code(b[6]).ok_or(FormatError::Kind(b[6]))?;
        let h = Header {
            kind,
            level: b[7],
            page_size: be32(b, 8),
            txns: be32(b, 12),
            slots: be64(b, 16),
            min_txid: be64(b, 24),
            max_txid: be64(b, 32),
            created_ms: be64(b, 40),
            nonce: be64(b, 48),
            lease_epoch: be64(b, 56),
            index_len: be64(b, 72),
            data_offset: be64(b, 80),
            len: be64(b, 88),
        };
        h.validate(be64(b, 64))?;
        Ok(h)
    }

    fn validate(&self, index_offset: u64) -> Result<(), FormatError> {
        let bad = |why: String| Err(FormatError::Invalid(why));
        if index_offset != HEADER_SIZE as u64 {
            return bad(format!("index offset {index_offset}"));
        }
        if !crate::ltx::valid_page_size(self.page_size) {
            return bad(format!("page size {}", self.page_size));
        }
        if self.txns == 0 || self.min_txid == 0 || self.min_txid > self.max_txid {
            return bad(format!(
                "{} transactions, TXIDs {}..={}",
                self.txns, self.min_txid, self.max_txid
            ));
        }
        // Checked arithmetic: the header comes from the bucket, not from this code.
        let lengths = (|| {
            let entries = self.slots.checked_mul(self.kind.entry_size() as u64)?;
            let index = (u64::from(self.txns) * TXN_RECORD_SIZE as u64)
                .checked_add(entries)?
                .checked_add(8)?;
            let data = (HEADER_SIZE as u64).checked_add(index)?;
            let len = match self.kind {
                Kind::Pointer => data.checked_add(self.len.checked_sub(data)?)?,
                _ => data.checked_add(self.slots.checked_mul(u64::from(self.page_size))?)?,
            };
            Some((index, data, len))
        })();
        match lengths {
            Some((index, data, len))
                if (index, data, len) == (self.index_len, self.data_offset, self.len) => {}
            _ => return bad("lengths do not match the counts".into()),
        }
        if self.kind == Kind::Pointer && (self.slots != 0 || self.len - self.data_offset > 1024) {
            return bad("pointer with slots, or a key over 1 KiB".into());
        }
        Ok(())
    }

    /// Byte range of slot `slot`'s page data.
    pub fn slot_range(&self, slot: u64) -> std::ops::Range<u64> {
        let start = self.data_offset + slot * u64::from(self.page_size);
        start..start + u64::from(self.page_size)
    }

    /// Byte range of the index (transaction records, slot entries, CRC).
    pub fn index_range(&self) -> std::ops::Range<u64> {
        HEADER_SIZE as u64..self.data_offset
    }
}

/// Bytes of the index of an object with these counts (CRC included).
pub fn index_len(kind: Kind, txns: u32, slots: u64) -> u64 {
    u64::from(txns) * TXN_RECORD_SIZE as u64 + slots * kind.entry_size() as u64 + 8
}

/// One transaction held by an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnRecord {
    pub min_txid: u64,
    pub max_txid: u64,
    pub page_size: u32,
    pub commit: u32,
    pub timestamp_ms: u64,
    pub pre_apply: u64,
    pub post_apply: u64,
    pub created_ms: u64,
    /// Its page versions are slots `first_slot..` up to the next record's first slot.
    pub first_slot: u64,
}

impl TxnRecord {
    pub fn encode(&self) -> [u8; TXN_RECORD_SIZE] {
        let mut b = [0u8; TXN_RECORD_SIZE];
        b[0..8].copy_from_slice(&self.min_txid.to_be_bytes());
        b[8..16].copy_from_slice(&self.max_txid.to_be_bytes());
        b[16..20].copy_from_slice(&self.page_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.commit.to_be_bytes());
        for (o, v) in [
            (24, self.timestamp_ms),
            (32, self.pre_apply),
            (40, self.post_apply),
            (48, self.created_ms),
            (56, self.first_slot),
        ] {
            b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> TxnRecord {
        TxnRecord {
            min_txid: be64(b, 0),
            max_txid: be64(b, 8),
            page_size: be32(b, 16),
            commit: be32(b, 20),
            timestamp_ms: be64(b, 24),
            pre_apply: be64(b, 32),
            post_apply: be64(b, 40),
            created_ms: be64(b, 48),
            first_slot: be64(b, 56),
        }
    }
}

/// A slot entry: the page it holds and that page's checksum.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pgno: u32,
    pub ck: u64,
}

/// The page number held by slot `slot` of an IMAGE object.
pub fn image_pgno(page_size: u32, slot: u64) -> u32 {
    let p = (slot + 1) as u32;
    if p >= lock_page(page_size) { p + 1 } else { p }
}

/// The slot holding `pgno` in an IMAGE object (`None` for the lock page).
pub fn image_slot(page_size: u32, pgno: u32) -> Option<u64> {
    let lock = lock_page(page_size);
    match pgno.cmp(&lock) {
        std::cmp::Ordering::Less => Some(u64::from(pgno) - 1),
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(u64::from(pgno) - 2),
    }
}

/// Pages of an image of `commit` pages (the lock page is not stored).
pub fn image_slots(page_size: u32, commit: u32) -> u64 {
    u64::from(commit) - u64::from(lock_page(page_size) <= commit)
}

/// Encodes one slot entry.
pub fn encode_entry(kind: Kind, e: Entry, out: &mut Vec<u8>) {
    if kind == Kind::Pages {
        out.extend_from_slice(&e.pgno.to_be_bytes());
    }
    out.extend_from_slice(&e.ck.to_be_bytes());
}

/// The decoded index of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    pub txns: Vec<TxnRecord>,
    pub entries: Vec<Entry>,
}

/// Decodes and verifies the index bytes of `h` (exactly `h.index_len` bytes).
pub fn decode_index(h: &Header, b: &[u8]) -> Result<Index, FormatError> {
    if b.len() as u64 != h.index_len {
        return Err(FormatError::Truncated("index"));
    }
    let body = &b[..b.len() - 8];
    if CRC64.checksum(body) != be64(b, b.len() - 8) {
        return Err(FormatError::Checksum("index"));
    }
    let t = h.txns as usize * TXN_RECORD_SIZE;
    let txns: Vec<TxnRecord> = body[..t]
        .chunks_exact(TXN_RECORD_SIZE)
        .map(TxnRecord::decode)
        .collect();
    let entries: Vec<Entry> = match h.kind {
        Kind::Pages => body[t..]
            .chunks_exact(12)
            .map(|c| Entry {
                pgno: be32(c, 0),
                ck: be64(c, 4),
            })
            .collect(),
        Kind::Image => body[t..]
            .chunks_exact(8)
            .enumerate()
            .map(|(i, c)| Entry {
                pgno: image_pgno(h.page_size, i as u64),
                ck: be64(c, 0),
            })
            .collect(),
        Kind::Pointer => Vec::new(),
    };
    let idx = Index { txns, entries };
    check_index(h, &idx)?;
    Ok(idx)
}

/// The rules an index keeps: records in TXID order, contiguous, inside the header's range, each
/// owning consecutive slots in increasing page order.
fn check_index(h: &Header, idx: &Index) -> Result<(), FormatError> {
    let bad = |why: String| Err(FormatError::Invalid(why));
    let (first, last) = match (idx.txns.first(), idx.txns.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return bad("no transaction records".into()),
    };
    if first.min_txid != h.min_txid || last.max_txid != h.max_txid {
        return bad("transaction records do not span the header's TXIDs".into());
    }
    for (i, t) in idx.txns.iter().enumerate() {
        let end = idx.txns.get(i + 1).map_or(h.slots, |n| n.first_slot);
        if t.min_txid > t.max_txid || t.first_slot > end || end > h.slots {
            return bad(format!("transaction record {i}"));
        }
        if let Some(n) = idx.txns.get(i + 1)
            && n.min_txid != t.max_txid + 1
        {
            return bad(format!(
                "transaction records {i} and {} not contiguous",
                i + 1
            ));
        }
        if h.kind == Kind::Pages {
            let pages = &idx.entries[t.first_slot as usize..end as usize];
            if pages.windows(2).any(|w| w[0].pgno >= w[1].pgno)
                || pages.iter().any(|e| e.pgno == 0 || e.pgno > t.commit)
            {
                return bad(format!("slots of transaction record {i}"));
            }
        }
    }
    if h.kind == Kind::Image && image_slots(h.page_size, last.commit) != h.slots {
        return bad("image slot count does not match its size".into());
    }
    Ok(())
}

/// Encodes the index (records, entries, CRC).
pub fn encode_index(kind: Kind, txns: &[TxnRecord], entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(txns.len() * TXN_RECORD_SIZE + entries.len() * 12 + 8);
    for t in txns {
        out.extend_from_slice(&t.encode());
    }
    for e in entries {
        encode_entry(kind, *e, &mut out);
    }
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::page_checksum;

    fn record(min: u64, max: u64, commit: u32, first_slot: u64) -> TxnRecord {
        TxnRecord {
            min_txid: min,
            max_txid: max,
            page_size: 512,
            commit,
            timestamp_ms: 7,
            pre_apply: 1 << 63,
            post_apply: (1 << 63) | 5,
            created_ms: 9,
            first_slot,
        }
    }

    #[test]
    fn pages_object_round_trips() {
        let txns = vec![record(3, 3, 4, 0), record(4, 6, 4, 2)];
        let entries: Vec<Entry> = [(1u32, 1u8), (4, 2), (2, 3)]
            .iter()
            .map(|&(p, b)| Entry {
                pgno: p,
                ck: page_checksum(p, &[b; 512]),
            })
            .collect();
        let h = Header::new(Kind::Pages, 1, 512, 2, 3, (3, 6), 42, 5, 0);
        let idx = encode_index(Kind::Pages, &txns, &entries);
        assert_eq!(idx.len() as u64, h.index_len);
        let back = Header::decode(&h.encode()).unwrap();
        assert_eq!(back, h);
        let got = decode_index(&back, &idx).unwrap();
        assert_eq!(got.txns, txns);
        assert_eq!(got.entries, entries);
        assert_eq!(h.slot_range(2), h.data_offset + 1024..h.data_offset + 1536);
        assert_eq!(h.len, h.data_offset + 3 * 512);
    }

    #[test]
    fn corruption_is_detected() {
        let h = Header::new(Kind::Pages, 0, 512, 1, 0, (1, 1), 1, 0, 0);
        let mut b = h.encode();
        b[30] ^= 1;
        assert_eq!(Header::decode(&b), Err(FormatError::Checksum("header")));
        let mut idx = encode_index(Kind::Pages, &[record(1, 1, 0, 0)], &[]);
        idx[3] ^= 1;
        assert_eq!(decode_index(&h, &idx), Err(FormatError::Checksum("index")));
        assert_eq!(
            Header::decode(&b[..100]),
            Err(FormatError::Truncated("header"))
        );
        let mut other = h.encode();
        other[0] = b'X';
        assert_eq!(Header::decode(&other), Err(FormatError::Magic));
    }

    #[test]
    fn absurd_headers_are_refused_not_panicked_on() {
        let mut h = Header::new(Kind::Pages, 0, 512, 1, 2, (1, 1), 1, 0, 0);
        h.slots = u64::MAX / 3;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(FormatError::Invalid(_))
        ));
        let mut p = Header::new(Kind::Pointer, 0, 512, 1, 0, (1, 1), 1, 0, 20);
        p.len = p.data_offset - 1;
        assert!(matches!(
            Header::decode(&p.encode()),
            Err(FormatError::Invalid(_))
        ));
        p.len = p.data_offset + 5000;
        assert!(matches!(
            Header::decode(&p.encode()),
            Err(FormatError::Invalid(_))
        ));
        let ok = Header::new(Kind::Pointer, 0, 512, 1, 0, (1, 1), 1, 0, 20);
        assert_eq!(Header::decode(&ok.encode()), Ok(ok));
    }

    #[test]
    fn index_rules() {
        let h = Header::new(Kind::Pages, 0, 512, 1, 2, (1, 1), 1, 0, 0);
        let e = |p| Entry { pgno: p, ck: 1 };
        // Out of order, and past the commit size.
        for entries in [vec![e(2), e(1)], vec![e(1), e(9)]] {
            let idx = encode_index(Kind::Pages, &[record(1, 1, 4, 0)], &entries);
            assert!(matches!(
                decode_index(&h, &idx),
                Err(FormatError::Invalid(_))
            ));
        }
        // Records that skip a TXID.
        let h2 = Header::new(Kind::Pages, 0, 512, 2, 0, (1, 3), 1, 0, 0);
        let idx = encode_index(Kind::Pages, &[record(1, 1, 0, 0), record(3, 3, 0, 0)], &[]);
        assert!(matches!(
            decode_index(&h2, &idx),
            Err(FormatError::Invalid(_))
        ));
    }

    #[test]
    fn image_slots_skip_the_lock_page() {
        let ps = 512;
        let lock = lock_page(ps);
        assert_eq!(image_slot(ps, 1), Some(0));
        assert_eq!(image_slot(ps, lock), None);
        assert_eq!(image_slot(ps, lock + 1), Some(u64::from(lock) - 1));
        for slot in [
            0,
            5,
            u64::from(lock) - 2,
            u64::from(lock) - 1,
            u64::from(lock) + 7,
        ] {
            assert_eq!(image_slot(ps, image_pgno(ps, slot)), Some(slot));
        }
        assert_eq!(image_slots(ps, lock - 1), u64::from(lock) - 1);
        assert_eq!(image_slots(ps, lock + 1), u64::from(lock));
    }
}
