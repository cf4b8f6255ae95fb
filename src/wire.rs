//! Wire types of the page-store HTTP API, shared by the server and the client.
//!
//! Owns the JSON shapes (positions, pages, leases, change sets, error bodies), the error codes with
//! their HTTP statuses, the name rules for databases and clusters, and the binary page-frame
//! encoding that is our extension to the LiteFS Cloud API. Everything here follows
//! `spec/page-store-api.md` sections 1 and 2; it performs no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Request header carrying the write lease id on `POST /db/tx`.
pub const HEADER_LEASE_ID: &str = "Lfsc-Lease-Id";
/// Response header of `POST /db/tx`: the high-water mark, 16 hex digits.
pub const HEADER_HWM: &str = "Litefs-Hwm";
/// Request header naming the client's LiteFS cluster id (`LFSC` + 16 uppercase hex digits).
pub const HEADER_CLUSTER_ID: &str = "Litefs-Cluster-Id";
/// Media type a client sends in `Accept` on `GET /db/page` to get binary page frames
/// ([`encode_page_frames`]) instead of JSON with base64.
pub const MEDIA_PAGE_FRAMES: &str = "application/vnd.litevfs.pages";
/// Largest `wait` (milliseconds) the server honours on a long-poll sync.
pub const MAX_SYNC_WAIT_MS: u64 = 30_000;

/// A transaction id. Written as 16 lowercase hex digits on the wire; 0 means "none".
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Txid(pub u64);

/// A database checksum (rolling XOR of page checksums). 16 lowercase hex digits on the wire.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Checksum(pub u64);

/// A replication position: the TXID of the last applied transaction and the database checksum
/// after it. [`Pos::ZERO`] means "the database is known but holds no data".
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pos {
    pub txid: Txid,
    pub checksum: Checksum,
}

/// Why a hex value, a position or a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("expected 16 hex digits, got {0:?}")]
    Hex(String),
    #[error("expected a position as <16 hex txid>/<16 hex checksum>, got {0:?}")]
    Pos(String),
    #[error("a position with txid 0 must have checksum 0, got {0:?}")]
    ZeroTxidChecksum(String),
}

fn parse_hex16(s: &str) -> Result<u64, ParseError> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ParseError::Hex(s.to_string()));
    }
    u64::from_str_radix(s, 16).map_err(|_| ParseError::Hex(s.to_string()))
}

impl fmt::Display for Txid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Txid {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        parse_hex16(s).map(Txid)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Checksum {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        parse_hex16(s).map(Checksum)
    }
}

macro_rules! hex_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_serde!(Txid);
hex_serde!(Checksum);

impl Pos {
    pub const ZERO: Pos = Pos {
        txid: Txid(0),
        checksum: Checksum(0),
    };

    pub fn new(txid: u64, checksum: u64) -> Pos {
        Pos {
            txid: Txid(txid),
            checksum: Checksum(checksum),
        }
    }

    pub fn is_zero(&self) -> bool {
        self.txid.0 == 0
    }

    /// `None` for the zero position, as litevfs clients treat it.
    pub fn non_zero(self) -> Option<Pos> {
        (!self.is_zero()).then_some(self)
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.txid, self.checksum)
    }
}

impl FromStr for Pos {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (t, c) = s
            .split_once('/')
            .ok_or_else(|| ParseError::Pos(s.to_string()))?;
        let pos = Pos {
            txid: t.parse().map_err(|_| ParseError::Pos(s.to_string()))?,
            checksum: c.parse().map_err(|_| ParseError::Pos(s.to_string()))?,
        };
        if pos.txid.0 == 0 && pos.checksum.0 != 0 {
            return Err(ParseError::ZeroTxidChecksum(s.to_string()));
        }
        Ok(pos)
    }
}

impl Serialize for Pos {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Repr {
            txid: Txid,
            #[serde(rename = "postApplyChecksum")]
            post_apply_checksum: Checksum,
        }
        Repr {
            txid: self.txid,
            post_apply_checksum: self.checksum,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Pos {
    /// Accepts the key names case-insensitively: Go servers built on `ltx.Pos` emit
    /// `TXID`/`PostApplyChecksum` (spec 1.1).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = BTreeMap::<String, String>::deserialize(d)?;
        let mut txid = None;
        let mut checksum = None;
        for (k, v) in map {
            match k.to_ascii_lowercase().as_str() {
                "txid" => txid = Some(v.parse::<Txid>().map_err(D::Error::custom)?),
                "postapplychecksum" => {
                    checksum = Some(v.parse::<Checksum>().map_err(D::Error::custom)?)
                }
                _ => {}
            }
        }
        let txid = txid.ok_or_else(|| D::Error::missing_field("txid"))?;
        let checksum = checksum.ok_or_else(|| D::Error::missing_field("postApplyChecksum"))?;
        if txid.0 == 0 && checksum.0 != 0 {
            return Err(D::Error::custom(
                "a position with txid 0 must have checksum 0",
            ));
        }
        Ok(Pos { txid, checksum })
    }
}

/// One page in a `GET /db/page` JSON response; `data` is standard base64 with padding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub pgno: u32,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
}

/// Body of a `GET /db/page` JSON response.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesResponse {
    pub pages: Vec<Page>,
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// A write lease as returned by `POST /lease`. `expires_at` is RFC 3339.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: time::OffsetDateTime,
}

/// What changed in one database after a client's position (spec 2.5).
///
/// `all: true` means "drop everything cached"; otherwise `pgnos` lists the pages modified after
/// the client's position up to and including `pos`. Absent, null or empty `pgnos` means no change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    pub pos: Pos,
    #[serde(default)]
    pub pgnos: Option<Vec<u32>>,
    #[serde(default)]
    pub all: Option<bool>,
}

impl Changes {
    pub fn drops_all(&self) -> bool {
        self.all == Some(true)
    }
}

/// Body of `POST /sync`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub positions: BTreeMap<String, Pos>,
}

/// Reply to `POST /sync`: an entry for every requested database that exists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    pub changes: BTreeMap<String, Changes>,
}

/// Reply of `POST /db/upload` and `POST /db/restore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxidResponse {
    #[serde(rename = "txID")]
    pub txid: Txid,
}

/// Reply of `GET /info`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    #[serde(rename = "clusterID")]
    pub cluster_id: Option<String>,
}

/// Every error the API returns, with its wire code and HTTP status (spec 1.3).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    PosMismatch,
    InvalidAuth,
    Forbidden,
    BadCluster,
    BadDb,
    BadInput,
    BadFormat,
    BadChecksum,
    MissingPages,
    BadPos,
    InvalidPgno,
    NoDb,
    NoTxid,
    NoPage,
    NoTimestamp,
    NoRoute,
    MethodNotAllowed,
    NoPrevPage,
    LeaseExists,
    NoLease,
    LeaseMismatch,
    BadHeader,
    TooLarge,
    Internal,
    Unavailable,
    CommitUnknown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 26] = [
        ErrorCode::PosMismatch,
        ErrorCode::InvalidAuth,
        ErrorCode::Forbidden,
        ErrorCode::BadCluster,
        ErrorCode::BadDb,
        ErrorCode::BadInput,
        ErrorCode::BadFormat,
        ErrorCode::BadChecksum,
        ErrorCode::MissingPages,
        ErrorCode::BadPos,
        ErrorCode::InvalidPgno,
        ErrorCode::NoDb,
        ErrorCode::NoTxid,
        ErrorCode::NoPage,
        ErrorCode::NoTimestamp,
        ErrorCode::NoRoute,
        ErrorCode::MethodNotAllowed,
        ErrorCode::NoPrevPage,
        ErrorCode::LeaseExists,
        ErrorCode::NoLease,
        ErrorCode::LeaseMismatch,
        ErrorCode::BadHeader,
        ErrorCode::TooLarge,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::CommitUnknown,
    ];

    /// The code string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::PosMismatch => "EPOSMISMATCH",
            ErrorCode::InvalidAuth => "EINVALIDAUTH",
            ErrorCode::Forbidden => "EFORBIDDEN",
            ErrorCode::BadCluster => "EBADCLUSTER",
            ErrorCode::BadDb => "EBADDB",
            ErrorCode::BadInput => "EBADINPUT",
            ErrorCode::BadFormat => "EBADFORMAT",
            ErrorCode::BadChecksum => "EBADCHECKSUM",
            ErrorCode::MissingPages => "EMISSINGPAGES",
            ErrorCode::BadPos => "EBADPOS",
            ErrorCode::InvalidPgno => "EINVALIDPGNO",
            ErrorCode::NoDb => "ENODB",
            ErrorCode::NoTxid => "ENOTXID",
            ErrorCode::NoPage => "ENOPAGE",
            ErrorCode::NoTimestamp => "ENOTIMESTAMP",
            ErrorCode::NoRoute => "ENOROUTE",
            ErrorCode::MethodNotAllowed => "EMETHOD",
            ErrorCode::NoPrevPage => "ENOPREVPAGE",
            ErrorCode::LeaseExists => "ELEASEEXISTS",
            ErrorCode::NoLease => "ENOLEASE",
            ErrorCode::LeaseMismatch => "ELEASEMISMATCH",
            ErrorCode::BadHeader => "EBADHEADER",
            ErrorCode::TooLarge => "ETOOLARGE",
            ErrorCode::Internal => "EINTERNAL",
            ErrorCode::Unavailable => "EUNAVAILABLE",
            ErrorCode::CommitUnknown => "ECOMMITUNKNOWN",
        }
    }

    /// The HTTP status the code is sent with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadCluster
            | ErrorCode::BadDb
            | ErrorCode::BadInput
            | ErrorCode::BadFormat
            | ErrorCode::BadChecksum
            | ErrorCode::MissingPages
            | ErrorCode::BadPos
            | ErrorCode::InvalidPgno => 400,
            ErrorCode::InvalidAuth => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NoDb
            | ErrorCode::NoTxid
            | ErrorCode::NoPage
            | ErrorCode::NoTimestamp
            | ErrorCode::NoRoute
            | ErrorCode::NoLease => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PosMismatch | ErrorCode::NoPrevPage | ErrorCode::LeaseExists => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::LeaseMismatch | ErrorCode::BadHeader => 422,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable | ErrorCode::CommitUnknown => 503,
        }
    }

    pub fn from_code(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error reply. `pos` is present only with `EPOSMISMATCH`, never `null`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<Pos>,
}

/// Why a database or cluster name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {max} characters")]
    TooLong { max: usize },
    #[error("name must not start with '.'")]
    LeadingDot,
    #[error("name contains {0:?}; allowed are A-Z, a-z, 0-9, '_', '.', '-'")]
    BadChar(char),
}

fn validate_name(name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.chars().count() > max {
        return Err(NameError::TooLong { max });
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
    {
        return Err(NameError::BadChar(c));
    }
    Ok(())
}

/// Database names: 1-256 characters from `[A-Za-z0-9_.-]`, not starting with `.` (spec 1.2).
/// This rules out `/`, `..` as a path component and every other path-like name.
pub fn validate_db_name(name: &str) -> Result<(), NameError> {
    validate_name(name, 256)
}

/// Cluster names: 1-32 characters, same alphabet and rules as database names.
pub fn validate_cluster_name(name: &str) -> Result<(), NameError> {
    validate_name(name, 32)
}

/// Encodes pages as binary frames: for each page `pgno u32 BE`, `len u32 BE`, then `len` bytes.
pub fn encode_page_frames<'a>(pages: impl IntoIterator<Item = (u32, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (pgno, data) in pages {
        out.extend_from_slice(&pgno.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// Decodes [`encode_page_frames`] output. Fails on a truncated frame.
pub fn decode_page_frames(mut body: &[u8]) -> Result<Vec<Page>, String> {
    let mut pages = Vec::new();
    while !body.is_empty() {
        if body.len() < 8 {
            return Err(format!(
                "truncated page frame header ({} bytes)",
                body.len()
            ));
        }
        let pgno = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
        if body.len() < 8 + len {
            return Err(format!("truncated page frame for page {pgno}"));
        }
        pages.push(Page {
            pgno,
            data: body[8..8 + len].to_vec(),
        });
        body = &body[8 + len..];
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pos_json() {
        let z = r#"{"txid":"0000000000000000","postApplyChecksum":"0000000000000000"}"#;
        assert_eq!(serde_json::to_string(&Pos::ZERO).unwrap(), z);
        assert_eq!(serde_json::from_str::<Pos>(z).unwrap(), Pos::ZERO);
    }

    #[test]
    fn pos_json_and_string() {
        let j = r#"{"txid":"0000000000000002","postApplyChecksum":"80000000000007d0"}"#;
        let p: Pos = serde_json::from_str(j).unwrap();
        assert_eq!(p, Pos::new(2, 0x80000000000007d0));
        assert_eq!(serde_json::to_string(&p).unwrap(), j);
        assert_eq!(p.to_string(), "0000000000000002/80000000000007d0");
        assert_eq!(
            "0000000000000002/80000000000007d0".parse::<Pos>().unwrap(),
            p
        );
        let go = r#"{"TXID":"0000000000000002","PostApplyChecksum":"80000000000007d0"}"#;
        assert_eq!(serde_json::from_str::<Pos>(go).unwrap(), p);
    }

    #[test]
    fn bad_pos_strings() {
        for s in [
            "",
            "2/3",
            "0000000000000002",
            "000000000000000g/80000000000007d0",
            "0000000000000000/80000000000007d0",
            "0000000000000002/80000000000007d0/",
        ] {
            assert!(s.parse::<Pos>().is_err(), "{s}");
        }
    }

    #[test]
    fn page_and_lease_json() {
        let p: Page = serde_json::from_str(r#"{"pgno":123,"data":"AQIDBAUG"}"#).unwrap();
        assert_eq!(
            p,
            Page {
                pgno: 123,
                data: vec![1, 2, 3, 4, 5, 6]
            }
        );
        let l: Lease = serde_json::from_str(
            r#"{"id":"123456789","expires_at":"2023-08-29T11:20:55.706550992Z"}"#,
        )
        .unwrap();
        assert_eq!(l.id, "123456789");
    }

    #[test]
    fn pos_mismatch_error_body() {
        let body = ErrorBody {
            code: ErrorCode::PosMismatch.to_string(),
            error: "position mismatch".into(),
            pos: Some(Pos::new(1, 0x80000000000003e8)),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"EPOSMISMATCH","error":"position mismatch","pos":{"txid":"0000000000000001","postApplyChecksum":"80000000000003e8"}}"#
        );
        let no_pos = ErrorBody {
            code: "ENODB".into(),
            error: "x".into(),
            pos: None,
        };
        assert!(!serde_json::to_string(&no_pos).unwrap().contains("pos"));
    }

    #[test]
    fn codes_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.as_str()), Some(c));
        }
        assert_eq!(ErrorCode::PosMismatch.status(), 409);
    }

    #[test]
    fn names() {
        assert!(validate_db_name("db1.sqlite-x_y").is_ok());
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "../x",
            "a b",
            "é",
            &"x".repeat(257),
        ] {
            assert!(validate_db_name(bad).is_err(), "{bad}");
        }
        assert!(validate_cluster_name(&"c".repeat(33)).is_err());
    }

    #[test]
    fn page_frames_round_trip() {
        let body = encode_page_frames([(1, &[1u8, 2][..]), (7, &[3u8][..])]);
        let pages = decode_page_frames(&body).unwrap();
        assert_eq!(
            pages,
            vec![
                Page {
                    pgno: 1,
                    data: vec![1, 2]
                },
                Page {
                    pgno: 7,
                    data: vec![3]
                }
            ]
        );
        assert!(decode_page_frames(&body[..body.len() - 1]).is_err());
    }
}

/// Response header of `GET /db/page` (our extension, optional): the LTX page checksum
/// (`crate::ltx::page_checksum`) of every returned page, as comma-separated `pgno:16hex` pairs.
/// A client that finds it verifies each page before caching it; servers that do not send it
/// stay compatible.
pub const HEADER_PAGE_CHECKSUMS: &str = "Litevfs-Page-Checksums";

/// Response header of `GET /db/page` and `GET /db/snapshot` (our extension): the position the
/// pages are from. `GET /db/page` without `pos` serves the store's latest position, so a cold
/// client learns the position and page 1 in one round trip.
pub const HEADER_POS: &str = "Litevfs-Pos";

/// Response header of `GET /db/page` (our extension, optional): the database size in pages at
/// the position the pages are from (the LTX commit field). SQLite takes the size from page 1's
/// header only when that count is valid, and from the file size otherwise (files last written
/// before SQLite 3.7.0 may hold 0 there): this is the file size a client must present.
pub const HEADER_DB_SIZE: &str = "Litevfs-Db-Size";

/// Formats the value of [`HEADER_PAGE_CHECKSUMS`].
pub fn encode_page_checksums(pages: impl IntoIterator<Item = (u32, u64)>) -> String {
    pages
        .into_iter()
        .map(|(p, c)| format!("{p}:{}", Checksum(c)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses the value of [`HEADER_PAGE_CHECKSUMS`].
pub fn parse_page_checksums(s: &str) -> Result<BTreeMap<u32, Checksum>, ParseError> {
    let bad = || ParseError::Hex(s.chars().take(64).collect());
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (p, c) = e.split_once(':').ok_or_else(bad)?;
            Ok((p.parse().map_err(|_| bad())?, c.parse()?))
        })
        .collect()
}

#[cfg(test)]
mod page_checksum_header_tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = encode_page_checksums([(1, 0x8000000000000001), (42, 0xc24e177cdfeaa333)]);
        assert_eq!(v, "1:8000000000000001,42:c24e177cdfeaa333");
        let m = parse_page_checksums(&v).unwrap();
        assert_eq!(m[&42], Checksum(0xc24e177cdfeaa333));
        assert!(parse_page_checksums("1:xyz").is_err());
        assert!(parse_page_checksums("").unwrap().is_empty());
    }
}
