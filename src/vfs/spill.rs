//! Write transactions in bounded memory: what a transaction accumulates stays in RAM up to
//! `LITEVFS_TXN_MEMORY` and spills beyond it to anonymous files in the cache directory.
//!
//! Owns [`SpillBuf`] (a byte buffer for rollback journals and the LTX of a commit) and
//! [`DirtyPages`] (the pages a write transaction wrote). Spill files are unlinked at creation,
//! so they vanish with the process, a kill -9 included, and never look like state to the next
//! one. Memory held: at most the limit per buffer and per dirty set, plus one bit per page of
//! the database for the dirty set's spilled pages. It knows nothing of SQLite or the store.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::Pgno;

/// Default of `LITEVFS_TXN_MEMORY`.
pub const DEFAULT_TXN_MEMORY: u64 = 16 << 20;

/// An I/O error on a spill file, naming its directory.
#[derive(Debug, thiserror::Error)]
#[error("temporary file of a write transaction in {dir}: {source}")]
pub struct SpillError {
    pub dir: PathBuf,
    #[source]
    pub source: io::Error,
}

impl SpillError {
    /// The file system is full: SQLite reports that as `SQLITE_FULL`.
    pub fn is_full(&self) -> bool {
        self.source.raw_os_error() == Some(libc::ENOSPC)
    }

    /// The spill error an I/O error carries (one from an [`Appender`]).
    pub fn inside(e: &io::Error) -> Option<&SpillError> {
        e.get_ref().and_then(|e| e.downcast_ref::<SpillError>())
    }
}

pub type Result<T> = std::result::Result<T, SpillError>;

/// Where spill files go and when to start using them.
#[derive(Clone, Debug)]
pub struct SpillConfig {
    pub dir: PathBuf,
    /// Bytes kept in memory before spilling.
    pub limit: u64,
}

impl SpillConfig {
    fn tempfile(&self) -> Result<File> {
        tempfile::tempfile_in(&self.dir).map_err(|e| self.err(e))
    }

    fn err(&self, source: io::Error) -> SpillError {
        SpillError {
            dir: self.dir.clone(),
            source,
        }
    }
}

enum Data {
    Mem(Vec<u8>),
    File { file: Arc<File>, len: u64 },
}

/// A random-access byte buffer in memory up to the limit, then in an anonymous file.
pub struct SpillBuf {
    cfg: SpillConfig,
    data: Data,
}

impl SpillBuf {
    pub fn new(cfg: SpillConfig) -> SpillBuf {
        SpillBuf {
            cfg,
            data: Data::Mem(Vec::new()),
        }
    }

    pub fn len(&self) -> u64 {
        match &self.data {
            Data::Mem(v) => v.len() as u64,
            Data::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_spilled(&self) -> bool {
        matches!(self.data, Data::File { .. })
    }

    /// Moves the content to a file once `end` bytes would pass the limit.
    fn make_room(&mut self, end: u64) -> Result<()> {
        if let Data::Mem(v) = &self.data
            && end > self.cfg.limit
        {
            let file = self.cfg.tempfile()?;
            file.write_all_at(v, 0).map_err(|e| self.cfg.err(e))?;
            let len = v.len() as u64;
            self.data = Data::File {
                file: Arc::new(file),
                len,
            };
        }
        Ok(())
    }

    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        self.make_room(end)?;
        match &mut self.data {
            Data::Mem(v) => {
                let (o, e) = (offset as usize, end as usize);
                if v.len() < e {
                    v.resize(e, 0);
                }
                v[o..e].copy_from_slice(buf);
            }
            Data::File { file, len } => {
                file.write_all_at(buf, offset)
                    .map_err(|e| self.cfg.err(e))?;
                *len = (*len).max(end);
            }
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer at the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = self.len().saturating_sub(offset).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        match &self.data {
            Data::Mem(v) => buf[..n].copy_from_slice(&v[offset as usize..offset as usize + n]),
            Data::File { file, .. } => file
                .read_exact_at(&mut buf[..n], offset)
                .map_err(|e| self.cfg.err(e))?,
        }
        Ok(n)
    }

    pub fn set_len(&mut self, n: u64) -> Result<()> {
        match &mut self.data {
            Data::Mem(v) if n <= self.cfg.limit => v.resize(n as usize, 0),
            Data::Mem(_) => {
                self.make_room(n)?;
                return self.set_len(n);
            }
            Data::File { file, len } => {
                file.set_len(n).map_err(|e| self.cfg.err(e))?;
                *len = n;
            }
        }
        Ok(())
    }

    /// Appends, for building a file front to back.
    pub fn append(&mut self, buf: &[u8]) -> Result<()> {
        self.write_at(self.len(), buf)
    }

    /// The content as an HTTP request body; each call starts from the first byte, so a commit
    /// can be sent again.
    pub fn body(&self) -> reqwest::blocking::Body {
        match &self.data {
            Data::Mem(v) => reqwest::blocking::Body::from(v.clone()),
            Data::File { len, .. } => reqwest::blocking::Body::sized(self.reader(), *len),
        }
    }

    /// Writes the content, from the first byte, to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        match &self.data {
            Data::Mem(v) => w.write_all(v),
            Data::File { .. } => io::copy(&mut self.reader(), w).map(drop),
        }
    }

    /// Reads the content from the first byte, independently of other readers.
    pub fn reader(&self) -> Box<dyn Read + Send> {
        match &self.data {
            Data::Mem(v) => Box::new(io::Cursor::new(v.clone())),
            Data::File { file, len } => Box::new(FileReader {
                file: file.clone(),
                offset: 0,
                end: *len,
            }),
        }
    }

    /// A `Write` that appends to this buffer.
    pub fn writer(&mut self) -> Appender<'_> {
        Appender(self)
    }
}

/// Appends to a [`SpillBuf`].
pub struct Appender<'a>(&'a mut SpillBuf);

impl Write for Appender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .append(buf)
            .map_err(|e| io::Error::new(e.source.kind(), e))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a spill file from its own offset (a request body must not share a file offset).
struct FileReader {
    file: Arc<File>,
    offset: u64,
    end: u64,
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.offset).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "spill file shorter than written",
            ));
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// The pages of a write transaction: in memory up to the limit, then each page at its own
/// offset in a sparse file, `(pgno - 1) * page_size`, so the spilled part needs no index but
/// one bit per page.
pub struct DirtyPages {
    cfg: SpillConfig,
    page_size: u32,
    mem: BTreeMap<Pgno, Vec<u8>>,
    spill: Option<Spilled>,
}

struct Spilled {
    file: File,
    /// Bit `pgno - 1` is set when the page is in the file.
    present: Vec<u64>,
    count: usize,
}

impl Spilled {
    fn has(&self, p: Pgno) -> bool {
        let i = (p.0 - 1) as usize;
        self.present
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, p: Pgno) {
        let i = (p.0 - 1) as usize;
        if self.present.len() <= i / 64 {
            self.present.resize(i / 64 + 1, 0);
        }
        if self.present[i / 64] & (1 << (i % 64)) == 0 {
            self.present[i / 64] |= 1 << (i % 64);
            self.count += 1;
        }
    }

    /// The first spilled page at or after `from`.
    fn first_from(&self, from: Pgno) -> Option<Pgno> {
        let mut i = (from.0.max(1) - 1) as usize;
        while i / 64 < self.present.len() {
            let w = self.present[i / 64] >> (i % 64);
            if w != 0 {
                return Some(Pgno((i + w.trailing_zeros() as usize) as u32 + 1));
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Forgets pages after `size`.
    fn truncate(&mut self, size: u32) {
        let keep = size as usize;
        let words = keep.div_ceil(64);
        for w in self.present.iter().skip(words) {
            self.count -= w.count_ones() as usize;
        }
        self.present.truncate(words);
        if keep % 64 != 0
            && let Some(last) = self.present.last_mut()
        {
            let mask = (1u64 << (keep % 64)) - 1;
            self.count -= (*last & !mask).count_ones() as usize;
            *last &= mask;
        }
    }
}

impl DirtyPages {
    pub fn new(cfg: SpillConfig) -> DirtyPages {
        DirtyPages {
            cfg,
            page_size: 0,
            mem: BTreeMap::new(),
            spill: None,
        }
    }

    /// An empty set with the same configuration.
    pub fn fresh(&self) -> DirtyPages {
        DirtyPages::new(self.cfg.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.mem.len() + self.spill.as_ref().map_or(0, |s| s.count)
    }

    /// Whether some pages live in the spill file.
    pub fn is_spilled(&self) -> bool {
        self.spill.as_ref().is_some_and(|s| s.count > 0)
    }

    pub fn contains(&self, p: Pgno) -> bool {
        self.mem.contains_key(&p) || self.spill.as_ref().is_some_and(|s| s.has(p))
    }

    /// Records the transaction's content of page `p`. All pages have one size.
    pub fn insert(&mut self, p: Pgno, data: &[u8]) -> Result<()> {
        if self.page_size == 0 {
            self.page_size = data.len() as u32;
        }
        debug_assert_eq!(data.len(), self.page_size as usize);
        if let Some(v) = self.mem.get_mut(&p) {
            v.copy_from_slice(data);
            return Ok(());
        }
        let in_mem = (self.mem.len() as u64 + 1) * u64::from(self.page_size);
        if self.spill.is_none() && in_mem <= self.cfg.limit {
            self.mem.insert(p, data.to_vec());
            return Ok(());
        }
        if self.spill.is_none() {
            self.spill = Some(Spilled {
                file: self.cfg.tempfile()?,
                present: Vec::new(),
                count: 0,
            });
        }
        let s = self.spill.as_mut().expect("created above");
        let offset = u64::from(p.0 - 1) * u64::from(self.page_size);
        s.file
            .write_all_at(data, offset)
            .map_err(|e| self.cfg.err(e))?;
        s.set(p);
        Ok(())
    }

    /// Copies the transaction's content of page `p` into `buf`; `false` when it has none.
    pub fn get(&self, p: Pgno, buf: &mut [u8]) -> Result<bool> {
        if let Some(v) = self.mem.get(&p) {
            buf.copy_from_slice(v);
            return Ok(true);
        }
        match &self.spill {
            Some(s) if s.has(p) => {
                let offset = u64::from(p.0 - 1) * u64::from(self.page_size);
                s.file
                    .read_exact_at(buf, offset)
                    .map_err(|e| self.cfg.err(e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The first page of the set at or after `from`.
    pub fn first_from(&self, from: Pgno) -> Option<Pgno> {
        let m = self.mem.range(from..).next().map(|(p, _)| *p);
        let s = self.spill.as_ref().and_then(|s| s.first_from(from));
        match (m, s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The pages of the set within `from..=to`, in order, at most `max` of them.
    pub fn range(&self, from: Pgno, to: Pgno, max: usize) -> Vec<Pgno> {
        let mut out = Vec::new();
        let mut at = from;
        while out.len() < max {
            match self.first_from(at) {
                Some(p) if p <= to => {
                    out.push(p);
                    at = p.plus(1);
                }
                _ => break,
            }
        }
        out
    }

    /// Forgets pages after `size` (the database was truncated).
    pub fn truncate(&mut self, size: u32) -> Result<()> {
        self.mem.retain(|p, _| p.0 <= size);
        if let Some(s) = &mut self.spill {
            s.truncate(size);
            let bytes = u64::from(size) * u64::from(self.page_size);
            let cfg = &self.cfg;
            s.file.set_len(bytes).map_err(|e| cfg.err(e))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for DirtyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyPages")
            .field("in_memory", &self.mem.len())
            .field("spilled", &self.spill.as_ref().map_or(0, |s| s.count))
            .finish()
    }
}

/// Parses `LITEVFS_TXN_MEMORY`: a byte count (`16MiB`, `64M`, `1048576`); 0 spills everything
/// (slow: for tests that must exercise the spill files).
pub fn parse_txn_memory(v: &str) -> std::result::Result<u64, String> {
    super::config::parse_bytes(v).ok_or_else(|| {
        format!(
            "invalid LITEVFS_TXN_MEMORY {v:?}: a byte count such as 16MiB, 64M or 1048576; using {}MiB",
            DEFAULT_TXN_MEMORY >> 20
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(dir: &Path, limit: u64) -> SpillConfig {
        SpillConfig {
            dir: dir.to_path_buf(),
            limit,
        }
    }

    #[test]
    fn buffer_spills_past_its_limit_and_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let mut b = SpillBuf::new(cfg(d.path(), 1000));
        b.write_at(0, &[1; 600]).unwrap();
        assert!(!b.is_spilled());
        b.write_at(900, &[2; 600]).unwrap();
        assert!(b.is_spilled());
        assert_eq!(b.len(), 1500);
        let mut out = vec![9u8; 1500];
        assert_eq!(b.read_at(0, &mut out).unwrap(), 1500);
        assert_eq!(&out[..600], &[1; 600]);
        assert!(out[600..900].iter().all(|x| *x == 0));
        assert_eq!(&out[900..], &[2; 600]);
        assert_eq!(b.read_at(1400, &mut out).unwrap(), 100);
        assert_eq!(b.read_at(5000, &mut out).unwrap(), 0, "past the end");
        let small = SpillBuf::new(cfg(d.path(), 1000));
        assert_eq!(
            small.read_at(10, &mut out).unwrap(),
            0,
            "past the end, in memory"
        );
        b.set_len(10).unwrap();
        assert_eq!(b.len(), 10);
        // Nothing is left in the directory: the file is anonymous.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        b.append(&[3; 5]).unwrap();
        for _ in 0..2 {
            let mut body = Vec::new();
            b.reader().read_to_end(&mut body).unwrap();
            assert_eq!(body, [[1u8; 10].as_slice(), &[3; 5]].concat());
        }
    }

    #[test]
    fn dirty_pages_beyond_the_limit_go_to_the_file() {
        let d = tempfile::tempdir().unwrap();
        let mut dp = DirtyPages::new(cfg(d.path(), 2 * 512));
        for p in [5u32, 1, 200, 3, 64, 65, 128] {
            dp.insert(Pgno(p), &[p as u8; 512]).unwrap();
        }
        assert!(dp.is_spilled());
        assert_eq!(dp.len(), 7);
        dp.insert(Pgno(200), &[7; 512]).unwrap();
        assert_eq!(dp.len(), 7);
        assert_eq!(
            dp.range(Pgno(1), Pgno(u32::MAX), usize::MAX),
            [1, 3, 5, 64, 65, 128, 200].map(Pgno)
        );
        assert_eq!(dp.range(Pgno(4), Pgno(128), 2), [5, 64].map(Pgno));
        let mut buf = [0u8; 512];
        assert!(dp.get(Pgno(200), &mut buf).unwrap());
        assert_eq!(buf, [7; 512]);
        assert!(!dp.get(Pgno(2), &mut buf).unwrap());
        dp.truncate(64).unwrap();
        assert_eq!(
            dp.range(Pgno(1), Pgno(u32::MAX), 100),
            [1, 3, 5, 64].map(Pgno)
        );
        assert_eq!(dp.len(), 4);
        assert!(!dp.contains(Pgno(65)));
        dp.truncate(2).unwrap();
        assert_eq!(dp.len(), 1);
    }

    #[test]
    fn txn_memory_values() {
        assert_eq!(parse_txn_memory("16MiB"), Ok(16 << 20));
        assert_eq!(parse_txn_memory("65536"), Ok(65536));
        assert_eq!(parse_txn_memory("0"), Ok(0));
        assert!(parse_txn_memory("lots").is_err());
        assert!(parse_txn_memory("-1").is_err());
    }
}
