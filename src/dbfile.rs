//! Facts read from a SQLite database file header (the first 100 bytes of page 1).
//!
//! Owns only parsing; it never writes a header. Offsets follow SQLite's file-format document.

/// The 16-byte magic string at the start of every SQLite database.
pub const MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// Size of the database header at the start of page 1.
pub const HEADER_SIZE: usize = 100;

/// Why a byte string is not a usable SQLite database header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file is shorter than the 100-byte SQLite header")]
    Short,
    #[error("not a SQLite database (bad magic string)")]
    Magic,
    #[error("invalid page size {0} in the SQLite header")]
    PageSize(u32),
}

/// The parts of a SQLite header that the page store and the VFS care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbHeader {
    pub page_size: u32,
    /// "In-header database size" in pages (offset 28). Valid only when `size_valid`.
    pub page_count: u32,
    pub change_counter: u32,
    /// True when the in-header size can be trusted (version-valid-for equals the change counter).
    pub size_valid: bool,
    /// File format write version (offset 18): 1 legacy rollback journal, 2 WAL.
    pub write_version: u8,
    pub read_version: u8,
    /// Largest root b-tree page for auto-vacuum/incremental-vacuum (offset 52); 0 when off.
    pub autovacuum_root: u32,
}

impl DbHeader {
    pub fn parse(b: &[u8]) -> Result<DbHeader, HeaderError> {
        if b.len() < HEADER_SIZE {
            return Err(HeaderError::Short);
        }
        if &b[..16] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let raw = u16::from_be_bytes([b[16], b[17]]) as u32;
        let page_size = if raw == 1 { 65536 } else { raw };
        if !crate::ltx::valid_page_size(page_size) {
            return Err(HeaderError::PageSize(page_size));
        }
        let change_counter = be32(24);
        Ok(DbHeader {
            page_size,
            page_count: be32(28),
            change_counter,
            size_valid: be32(92) == change_counter,
            write_version: b[18],
            read_version: b[19],
            autovacuum_root: be32(52),
        })
    }

    pub fn is_wal(&self) -> bool {
        self.write_version == 2 || self.read_version == 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(page_size: u16, pages: u32) -> Vec<u8> {
        let mut b = vec![0u8; 100];
        b[..16].copy_from_slice(MAGIC);
        b[16..18].copy_from_slice(&page_size.to_be_bytes());
        b[18] = 1;
        b[19] = 1;
        b[24..28].copy_from_slice(&7u32.to_be_bytes());
        b[28..32].copy_from_slice(&pages.to_be_bytes());
        b[92..96].copy_from_slice(&7u32.to_be_bytes());
        b
    }

    #[test]
    fn parses_sizes() {
        let h = DbHeader::parse(&header(4096, 12)).unwrap();
        assert_eq!(
            (h.page_size, h.page_count, h.size_valid, h.is_wal()),
            (4096, 12, true, false)
        );
        assert_eq!(DbHeader::parse(&header(1, 1)).unwrap().page_size, 65536);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(DbHeader::parse(&[0; 50]), Err(HeaderError::Short));
        assert_eq!(DbHeader::parse(&[0; 100]), Err(HeaderError::Magic));
        assert_eq!(
            DbHeader::parse(&header(1000, 1)),
            Err(HeaderError::PageSize(1000))
        );
    }
}
