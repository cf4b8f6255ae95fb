//! Fuzzing a live page store on stable Rust: mutated LTX files (seeded from the spec's vectors)
//! and malformed HTTP requests, each on its own loopback connection. Every reply must be a JSON
//! error or a success, never a 5xx, and the server must stay up. Inputs that got a 5xx are kept
//! in `target/torture-findings/` for replay.

use std::time::{Duration, Instant};

use super::Tally;
use super::support::{Ctx, Reply, Rng, Store, http};
use crate::proc::Error;

/// CRC-64/GO-ISO (LTX's file checksum), bit by bit: only for re-sealing mutated files.
fn crc64_iso(data: &[u8]) -> u64 {
    let mut crc = !0u64;
    for b in data {
        crc ^= *b as u64;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xD800_0000_0000_0000
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Re-seals an uncompressed LTX file: its file checksum matches its (mutated) bytes again, so the
/// decoder looks past the checksum into the header, pages and trailer rules.
fn reseal(f: &mut [u8]) {
    if f.len() >= 16 {
        let n = f.len();
        let ck = (1u64 << 63) | crc64_iso(&f[..n - 8]);
        f[n - 8..].copy_from_slice(&ck.to_be_bytes());
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    512,
    4096,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    u64::MAX,
    1 << 63,
];

/// One mutation of `seed` (or of a splice of it with `other`).
pub fn mutate(seed: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut f = seed.to_vec();
    let rounds = rng.range(1, 4);
    for _ in 0..rounds {
        if f.is_empty() {
            f.push(0);
        }
        let at = rng.range(0, f.len() as u64) as usize;
        match rng.range(0, 8) {
            0 => f[at] ^= 1 << rng.range(0, 8),
            1 => f[at] = rng.next() as u8,
            2 => f.truncate(at),
            3 => {
                let junk: Vec<u8> = (0..rng.range(1, 64)).map(|_| rng.next() as u8).collect();
                f.splice(at..at, junk);
            }
            4 => {
                let end = (at + rng.range(1, 256) as usize).min(f.len());
                let chunk = f[at..end].to_vec();
                f.splice(at..at, chunk);
            }
            5 => {
                let cut = rng.range(0, other.len() as u64 + 1) as usize;
                f.truncate(at);
                f.extend_from_slice(&other[cut..]);
            }
            _ => {
                // A header field (the first 100 bytes) set to an interesting value.
                let v = INTERESTING[rng.range(0, INTERESTING.len() as u64) as usize];
                let width = if rng.chance(50) { 4 } else { 8 };
                let at = (rng.range(0, 100) as usize).min(f.len().saturating_sub(width));
                let bytes = v.to_be_bytes();
                let n = width.min(f.len() - at);
                f[at..at + n].copy_from_slice(&bytes[8 - width..8 - width + n]);
            }
        }
    }
    if rng.chance(60) {
        reseal(&mut f);
    }
    f
}

fn post(addr: &str, path: &str, body: &[u8]) -> std::io::Result<Reply> {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
        body,
    )
}

/// Judges one reply: 5xx and non-JSON errors are findings; no reply means check the server.
fn judge(
    t: &mut Tally,
    store: &mut Store,
    r: std::io::Result<Reply>,
    input: &[u8],
    kind: &str,
) -> Result<Option<u16>, Error> {
    match r {
        Ok(r) if r.status >= 500 => {
            t.errors_5xx += 1;
            keep(kind, t.errors_5xx, input);
            if t.errors_5xx <= 3 {
                t.notes
                    .push(format!("{kind}: {} {}", r.status, r.body_text().trim()));
            }
            Ok(Some(r.status))
        }
        // Our errors are JSON. A reply without a Content-Type is hyper refusing bytes that are
        // not HTTP (a bare 400 before any handler runs), and HEAD replies have no body.
        Ok(r)
            if r.status >= 400
                && r.has_content_type()
                && !kind.starts_with("HEAD")
                && !r.body_text().trim_start().starts_with('{') =>
        {
            t.wrong += 1;
            keep(kind, 1000 + t.wrong, input);
            t.notes
                .push(format!("{kind}: {} without a JSON error body", r.status));
            Ok(Some(r.status))
        }
        Ok(r) => Ok(Some(r.status)),
        Err(_) => {
            if let Some(status) = store.crashed() {
                t.crashes += 1;
                keep(kind, 2000 + t.crashes, input);
                t.notes.push(format!("{kind}: the server died: {status}"));
                store.restart()?;
            }
            Ok(None)
        }
    }
}

/// Saves an input that found something.
fn keep(kind: &str, n: u64, input: &[u8]) {
    let dir = crate::setup::target_dir().join("torture-findings");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{kind}-{n}.bin")), input);
}

/// Mutated LTX files posted to `/db/tx`: snapshots to fresh databases, incremental files onto
/// the position they were made for.
pub fn ltx(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let mut store = Store::start(ctx, "fuzz-ltx", &["--stall-timeout", "2s"])?;
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(&ctx.vectors)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "ltx") {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            seeds.push((name, std::fs::read(&p)?));
        }
    }
    seeds.sort();
    if seeds.is_empty() {
        return Err(Error(format!(
            "no .ltx vectors in {}",
            ctx.vectors.display()
        )));
    }
    let base = seeds
        .iter()
        .find(|(n, _)| n.starts_with("snapshot_B"))
        .cloned();
    let reset_base = |store: &Store| -> Result<(), Error> {
        let _ = http(
            &store.addr,
            "DELETE /db?db=base HTTP/1.1\r\nHost: t\r\n\r\n",
            b"",
        );
        if let Some((_, b)) = &base {
            let r = post(&store.addr, "/db/tx?db=base", b)?;
            if r.status != 200 {
                return Err(Error(format!("snapshot_B refused: {}", r.body_text())));
            }
        }
        Ok(())
    };
    reset_base(&store)?;
    let deadline = Instant::now() + budget;
    let (mut accepted, mut i) = (0u64, 0u64);
    while t.trials == 0 || Instant::now() < deadline {
        i += 1;
        let (name, seed) = &seeds[rng.range(0, seeds.len() as u64) as usize];
        let other = &seeds[rng.range(0, seeds.len() as u64) as usize].1;
        let input = mutate(seed, other, rng);
        let incremental = name.starts_with("incremental");
        let path = if incremental {
            "/db/tx?db=base".to_string()
        } else {
            format!("/db/tx?db=f{i}")
        };
        let r = post(&store.addr, &path, &input);
        let status = judge(&mut t, &mut store, r, &input, "ltx")?;
        t.trials += 1;
        if status == Some(200) {
            accepted += 1;
            if incremental {
                reset_base(&store)?;
            }
        }
    }
    t.acked = accepted;
    t.notes.push(format!(
        "{} mutated files from {} vectors (60% re-sealed with a valid file checksum): {accepted} \
         valid and accepted, the rest refused with a JSON error",
        t.trials,
        seeds.len(),
    ));
    t.errors_5xx = t.errors_5xx.max(store.count_5xx());
    alive(&mut t, &mut store)?;
    Ok(t)
}

fn alive(t: &mut Tally, store: &mut Store) -> Result<(), Error> {
    match http(&store.addr, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", b"") {
        Ok(r) if r.status == 200 => Ok(()),
        other => {
            t.crashes += 1;
            t.notes.push(format!(
                "the server does not answer /healthz: {:?}",
                other.map(|r| r.status)
            ));
            Ok(())
        }
    }
}

const METHODS: &[&str] = &[
    "GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "G\tET", "XYZZY", "get",
];
const PATHS: &[&str] = &[
    "/pos",
    "/hwm",
    "/db/tx",
    "/db/page",
    "/db/sync",
    "/sync",
    "/lease",
    "/db/snapshot",
    "/db/upload",
    "/db",
    "/db/restore",
    "/info",
    "/healthz",
    "/metrics",
    "/",
    "//db//tx",
    "/db/../pos",
    "/%2e%2e/pos",
    "/db/page/",
    "*",
    "http://127.0.0.1/pos",
];
const KEYS: &[&str] = &[
    "db",
    "pos",
    "pgno",
    "id",
    "duration",
    "hold",
    "txid",
    "wait",
    "format",
    "cluster",
    "timestamp",
    "",
];
const VALUES: &[&str] = &[
    "",
    "a",
    "fz",
    "../x",
    "%2e%2e%2fx",
    "%00",
    "%",
    "%zz",
    "-1",
    "0",
    "1",
    "4294967296",
    "18446744073709551616",
    "0000000000000001/0000000000000000",
    "0000000000000001/8000000000000000",
    "ffffffffffffffff/ffffffffffffffff",
    "zzzz/zzzz",
    "1,2,3",
    ",,,",
    "1,,2",
    "99999999999",
    "sqlite",
    "ltx",
    "2024-01-01T00:00:00Z",
    "30001",
    "600001",
    "%C3%A9",
    "a b",
    "*",
    ".hidden",
];
const HEADERS: &[&str] = &[
    "Content-Type: application/json",
    "Content-Type: application/octet-stream",
    "Accept: application/vnd.litevfs.pages",
    "Authorization: secret",
    "Authorization: ",
    "Lfsc-Lease-Id: x",
    "Lfsc-Lease-Id: \u{7f}",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "Expect: 100-continue",
    "Content-Length: -1",
    "Content-Length: 18446744073709551616",
    "Content-Encoding: gzip",
    "Litevfs-Pos: zz",
    "X: \u{1}",
    "NoColon",
];

/// Malformed requests of every shape: methods, paths, query strings, headers, bodies.
pub fn http_requests(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let mut store = Store::start(ctx, "fuzz-http", &["--stall-timeout", "300ms"])?;
    // Something to find: a database with a few positions and a lease.
    let seed = std::fs::read(ctx.vectors.join("snapshot_A.ltx")).unwrap_or_default();
    let _ = post(&store.addr, "/db/tx?db=fz", &seed);
    let deadline = Instant::now() + budget;
    // 0: closed without a reply; 1: `100 Continue` and nothing after it.
    let mut by_class = [0u64; 6];
    while t.trials == 0 || Instant::now() < deadline {
        let method = METHODS[rng.range(0, METHODS.len() as u64) as usize];
        let path = PATHS[rng.range(0, PATHS.len() as u64) as usize];
        let mut query = Vec::new();
        for _ in 0..rng.range(0, 5) {
            let k = KEYS[rng.range(0, KEYS.len() as u64) as usize];
            let v = if rng.chance(5) {
                "x".repeat(rng.range(200, 5000) as usize)
            } else {
                VALUES[rng.range(0, VALUES.len() as u64) as usize].to_string()
            };
            query.push(format!("{k}={v}"));
        }
        let mut target = path.to_string();
        if !query.is_empty() {
            target = format!("{target}?{}", query.join("&"));
        }
        let body: Vec<u8> = match rng.range(0, 5) {
            0 => Vec::new(),
            1 => br#"{"positions":{"fz":"0000000000000001/0000000000000000"}}"#.to_vec(),
            2 => br#"{"positions":{"fz":"zz"},"x":[1,2"#.to_vec(),
            3 => mutate(&seed, &seed, rng),
            _ => (0..rng.range(0, 2048)).map(|_| rng.next() as u8).collect(),
        };
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: t\r\n");
        let mut declared = false;
        for _ in 0..rng.range(0, 4) {
            let h = HEADERS[rng.range(0, HEADERS.len() as u64) as usize];
            declared |= h.starts_with("Content-Length") || h.starts_with("Transfer-Encoding");
            head.push_str(h);
            head.push_str("\r\n");
        }
        if !declared {
            // Mostly right, sometimes short or long (a stalled or cut body).
            let len = match rng.range(0, 20) {
                0 => body.len() + 10,
                1 => body.len().saturating_sub(1),
                _ => body.len(),
            };
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        head.push_str("\r\n");
        let mut input = head.clone().into_bytes();
        input.extend_from_slice(&body);
        let r = http(&store.addr, &head, &body);
        let kind = if method == "HEAD" { "HEAD" } else { "http" };
        let status = judge(&mut t, &mut store, r, &input, kind)?;
        let class = status.map_or(0, |s| (s / 100) as usize).min(5);
        by_class[class] += 1;
        t.trials += 1;
        if t.trials % 200 == 0 {
            alive(&mut t, &mut store)?;
        }
    }
    t.notes.push(format!(
        "{} requests: {} 2xx, {} 3xx, {} 4xx (JSON errors, or hyper's bare 400 for bytes that are \
         not HTTP), {} 5xx, {} `100 Continue` and nothing after it, {} closed without a reply",
        t.trials, by_class[2], by_class[3], by_class[4], by_class[5], by_class[1], by_class[0]
    ));
    alive(&mut t, &mut store)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_iso_check_value() {
        assert_eq!(crc64_iso(b"123456789"), 0xb909_56c7_75a4_1001);
    }

    #[test]
    fn mutations_are_reproducible_and_resealed_files_verify() {
        let seed: Vec<u8> = (0..200u8).collect();
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(mutate(&seed, &seed, &mut a), mutate(&seed, &seed, &mut b));
        }
        let mut f = seed.clone();
        reseal(&mut f);
        let n = f.len();
        let ck = u64::from_be_bytes(f[n - 8..].try_into().unwrap());
        assert_eq!(ck, (1 << 63) | crc64_iso(&f[..n - 8]));
    }
}
