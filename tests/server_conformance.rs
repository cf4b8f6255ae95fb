//! Conformance of `litevfs serve` with the page-store API (spec sections 1-3, 9): the real
//! binary on loopback, real HTTP. History, sync, leases and images are in sibling files.

#[macro_use]
mod server_support;

use litevfs::ltx::{self, EMPTY_CHECKSUM, FLAG_LZ4};
use litevfs::wire::{
    ErrorBody, MEDIA_PAGE_FRAMES, PagesResponse, Pos, TxidResponse, decode_page_frames,
};
use server_support::{Model, Server, fake_sqlite, page, vector};

fn hdr(commit: u32, min: u64, max: u64, pre: u64) -> ltx::Header {
    ltx::Header {
        timestamp_ms: 0,
        ..ltx::Header::new(512, commit, min, max, pre)
    }
}

fn file_checksum(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[b.len() - 8..].try_into().unwrap())
}

/// Vectors 9-11, built by our encoder, checked against the spec's checksums and files.
fn vectors_abc() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let a = ltx::encode(&hdr(1, 1, 1, 0), &[(1, &[1; 512])], 0xe4e4aaa102377eee).unwrap();
    let b = ltx::encode(
        &hdr(2, 1, 1, 0),
        &[(1, &[3; 512]), (2, &[2; 512])],
        0x8b87423eeeeeeeee,
    )
    .unwrap();
    let c = ltx::encode(
        &hdr(2, 2, 2, 0x8b87423eeeeeeeee),
        &[(2, &[4; 512])],
        0xd078845888888888,
    )
    .unwrap();
    assert_eq!(file_checksum(&a), 0xa5764f2cc208d3e5);
    assert_eq!(file_checksum(&b), 0xbc78ebc48a1d06d2);
    assert_eq!(file_checksum(&c), 0x938d9bc6e6d69e5c);
    assert_eq!(a, vector("snapshot_A.ltx"));
    assert_eq!(b, vector("snapshot_B.ltx"));
    assert_eq!(c, vector("incremental_C_on_B.ltx"));
    (a, b, c)
}

fn pos_lists_databases_with_exact_json() {
    let s = Server::start(&[]);
    let api = s.api();
    assert_eq!(api.get("/pos", &[]).ok().text(), "{}");
    let (a, b, c) = vectors_abc();
    api.tx("a", a).ok();
    let r = api.tx("b", b).ok();
    assert_eq!(r.header("Litefs-Hwm").as_deref(), Some("0000000000000001"));
    assert!(r.body.is_empty());
    api.tx("b", c).ok();
    assert_eq!(
        api.get("/pos", &[]).ok().text(),
        r#"{"a":{"txid":"0000000000000001","postApplyChecksum":"e4e4aaa102377eee"},"b":{"txid":"0000000000000002","postApplyChecksum":"d078845888888888"}}"#
    );
    assert_eq!(
        api.get("/hwm", &[]).ok().text(),
        r#"{"a":"0000000000000001","b":"0000000000000002"}"#
    );
    assert_eq!(
        api.pos("b").unwrap().to_string(),
        "0000000000000002/d078845888888888"
    );
}

fn lz4_and_lfsb_vectors_are_accepted() {
    let s = Server::start(&[]);
    let api = s.api();
    let (_, b, _) = vectors_abc();
    api.tx("c", b).ok();
    let mut cz = hdr(2, 2, 2, 0x8b87423eeeeeeeee);
    cz.flags = FLAG_LZ4;
    let cz = ltx::encode(&cz, &[(2, &[4; 512])], 0xd078845888888888).unwrap();
    assert_eq!((cz.len(), file_checksum(&cz)), (148, 0xd8e02d44e72ae74e));
    api.tx("c", cz).ok();
    assert_eq!(api.pos("c"), Some(Pos::new(2, 0xd078845888888888)));
    // Spec 9.13: lfsb's LZ4 snapshots, one with pages and one with commit 0.
    let mut h = hdr(2, 1, 6, 0);
    h.flags = FLAG_LZ4;
    let five = ltx::encode(
        &h,
        &[(1, &[b'5'; 512]), (2, &[b'6'; 512])],
        0xad2dffe333333333,
    )
    .unwrap();
    assert_eq!(file_checksum(&five), 0xbb0e2065ff682755);
    api.tx("five", five).ok();
    assert_eq!(api.pos("five"), Some(Pos::new(6, 0xad2dffe333333333)));
    let mut h0 = hdr(0, 1, 6, 0);
    h0.flags = FLAG_LZ4;
    let empty = ltx::encode(&h0, &[], EMPTY_CHECKSUM).unwrap();
    assert_eq!(file_checksum(&empty), 0x8553be86dc216640);
    api.tx("empty", empty).ok();
    assert_eq!(api.pos("empty"), Some(Pos::new(6, EMPTY_CHECKSUM)));
    let snap = api.snapshot("empty");
    assert_eq!((snap.header.commit, snap.pages.len()), (0, 0));
    // LiteFS style: a compacted multi-TXID file, LZ4, sent with chunked encoding.
    let pre = 0xad2dffe333333333;
    let p2 = [b'7'; 512];
    let post = ltx::checksum_xor(
        ltx::checksum_xor(pre, ltx::page_checksum(2, &[b'6'; 512])),
        ltx::page_checksum(2, &p2),
    );
    let mut h = hdr(2, 7, 9, pre);
    h.flags = FLAG_LZ4;
    let multi = ltx::encode(&h, &[(2, &p2)], post).unwrap();
    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(multi));
    let rb = api.req(reqwest::Method::POST, "/db/tx", &[("db", "five")]);
    let r = api.send(rb.body(chunked)).ok();
    assert_eq!(r.header("Litefs-Hwm").as_deref(), Some("0000000000000009"));
    assert_eq!(api.pos("five"), Some(Pos::new(9, post)));
}

fn fake_snapshot_checksum_is_rejected() {
    let s = Server::start(&[]);
    let api = s.api();
    let fake = vector("lfsc_snapshot_fake_post_lz4.ltx");
    assert_eq!(file_checksum(&fake), 0xbdc35cf8b5a3384c);
    api.tx("x", fake).err(400, "EBADCHECKSUM");
    let mut w = ltx::Writer::new(Vec::new(), &hdr(2, 1, 4, 0)).unwrap();
    w.write_page(1, &[3; 512]).unwrap();
    w.write_page(2, &[2; 512]).unwrap();
    let (t, plain) = w.finish(0x8000000000000bb8).unwrap();
    assert_eq!(t.file_checksum, 0xc8d8c55bde12fe8d);
    api.tx("x", plain).err(400, "EBADCHECKSUM");
    assert_eq!(api.pos("x"), None, "a refused first upload creates nothing");
}

fn contiguity_rules_and_pos_mismatch_body() {
    let s = Server::start(&[]);
    let api = s.api();
    // Spec 9.6: an empty database refuses Min=2 with the zero pos.
    let min2 = ltx::encode(
        &hdr(1, 2, 2, 0x8000000000000001),
        &[(1, &[1; 512])],
        0x8000000000000002,
    )
    .unwrap();
    let e = api.tx("a", min2.clone()).err(409, "EPOSMISMATCH");
    assert_eq!(e.pos, Some(Pos::ZERO));
    let (a, _, _) = vectors_abc();
    api.tx("a", a.clone()).ok();
    // Snapshot again on a non-empty database, Min=3, and Min=2 with a wrong pre-apply checksum.
    let min3 = ltx::encode(
        &hdr(1, 3, 3, 0xe4e4aaa102377eee),
        &[(1, &[2; 512])],
        0x8000000000000002,
    )
    .unwrap();
    for bad in [a, min3, min2] {
        let r = api.tx("a", bad);
        r.err(409, "EPOSMISMATCH");
        assert_eq!(
            r.text(),
            r#"{"code":"EPOSMISMATCH","error":"position mismatch","pos":{"txid":"0000000000000001","postApplyChecksum":"e4e4aaa102377eee"}}"#
        );
    }
    assert_eq!(api.pos("a"), Some(Pos::new(1, 0xe4e4aaa102377eee)));
}

fn bad_ltx_changes_nothing() {
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(512);
    m.commit(
        &api,
        "d",
        3,
        &[(1, page(512, 1)), (2, page(512, 2)), (3, page(512, 3))],
    );
    let (good, _) = m.tx(3, &[(2, page(512, 9))]);
    for cut in [0, 10, 99, 100, 103, 300, good.len() - 17, good.len() - 1] {
        api.tx("d", good[..cut].to_vec()).err(400, "EBADFORMAT");
    }
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"extra");
    api.tx("d", trailing).err(400, "EBADFORMAT");
    let mut flipped = good.clone();
    flipped[200] ^= 0x40;
    let e = api.tx("d", flipped).err(400, "EBADFORMAT");
    assert!(e.error.contains("checksum"), "{}", e.error);
    let huge = ltx::encode(
        &hdr(1, 1, u64::MAX, 0),
        &[(1, &[1; 512])],
        0xe4e4aaa102377eee,
    )
    .unwrap();
    api.tx("huge", huge).err(400, "EBADFORMAT");
    api.tx("d", b"not an ltx file at all, just text".repeat(10))
        .err(400, "EBADFORMAT");
    // Wrong post-apply checksum on an incremental file.
    let hdr3 = ltx::Header::new(512, 3, 2, 2, m.pos.checksum.0);
    let wrong = ltx::encode(&hdr3, &[(2, &page(512, 9))], 0x8000000000001234).unwrap();
    api.tx("d", wrong).err(400, "EBADCHECKSUM");
    // Page size mismatch.
    let other = ltx::Header::new(1024, 3, 2, 2, m.pos.checksum.0);
    let ps = ltx::encode(&other, &[(1, &page(1024, 1))], 0x8000000000000001).unwrap();
    api.tx("d", ps).err(422, "EBADHEADER");
    // Growing from 3 to 5 pages with page 4 missing.
    let (_, grown) = m.tx(5, &[(4, page(512, 4)), (5, page(512, 5))]);
    let gap_hdr = ltx::Header::new(512, 5, 2, 2, m.pos.checksum.0);
    let gap = ltx::encode(&gap_hdr, &[(5, &page(512, 5))], grown.pos.checksum.0).unwrap();
    api.tx("d", gap).err(400, "EMISSINGPAGES");
    assert_eq!(api.pos("d"), Some(m.pos));
    let snap = api.snapshot("d");
    assert_eq!(snap.trailer.post_apply_checksum, m.checksum());
    assert_eq!(snap.pages[1].1, page(512, 2));
    // The good file still applies afterwards.
    api.tx("d", good).ok();
}

/// A database may legally reach TXID 7fffffffffffffff (the largest a SQLite integer holds).
/// Upload and restore append at head+1: that must be refused, not stored as a negative TXID
/// that leaves the store claiming one head and serving another.
fn txid_space_exhausted_is_refused_by_upload_and_restore() {
    let s = Server::start(&[]);
    let api = s.api();
    let top = i64::MAX as u64;
    let mut m = Model::new(512);
    m.commit(&api, "top", 1, &[(1, page(512, 7))]);
    let one = page(512, 1);
    let ck = ltx::checksum_xor(EMPTY_CHECKSUM, ltx::page_checksum(1, &one));
    let last = ltx::encode(&hdr(1, 2, top, m.pos.checksum.0), &[(1, &one)], ck).unwrap();
    api.tx("top", last).ok();
    let pos = api.pos("top").unwrap();
    assert_eq!(pos.txid.0, top);
    let mut file = page(512, 0);
    file[..16].copy_from_slice(b"SQLite format 3\0");
    file[16..18].copy_from_slice(&512u16.to_be_bytes());
    api.post("/db/upload", &[("db", "top")], file)
        .err(400, "EBADINPUT");
    let first = "0000000000000001";
    api.post("/db/restore", &[("db", "top"), ("txid", first)], vec![])
        .err(400, "EBADINPUT");
    let t = format!("{top:016x}");
    assert_eq!(api.pos("top"), Some(pos), "refused appends change nothing");
    let got = api.snapshot("top");
    assert_eq!(got.header.max_txid, top);
    assert_eq!(got.pages, vec![(1, one)]);
    let hwm: std::collections::BTreeMap<String, String> = api.get("/hwm", &[]).ok().json();
    assert_eq!(hwm["top"], t);
}

fn shrink_and_delete() {
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(512);
    m.commit(
        &api,
        "v",
        3,
        &[(1, page(512, 1)), (2, page(512, 2)), (3, page(512, 3))],
    );
    let before = m.pos;
    m.commit(&api, "v", 1, &[(1, page(512, 7))]);
    assert_eq!(api.pos("v"), Some(m.pos));
    let q = |pos: &Pos, pg: &str| {
        api.get(
            "/db/page",
            &[("db", "v"), ("pos", &pos.to_string()), ("pgno", pg)],
        )
    };
    q(&m.pos, "2").err(404, "ENOPAGE");
    let old: PagesResponse = q(&before, "2").ok().json();
    assert_eq!(old.pages[0].data, page(512, 2));
    let sync: litevfs::wire::Changes = api
        .get("/db/sync", &[("db", "v"), ("pos", &before.to_string())])
        .ok()
        .json();
    assert_eq!(sync.pgnos, Some(vec![1, 2, 3]));
    // Grow back: the regrown page must be in the file.
    m.commit(&api, "v", 2, &[(2, page(512, 8))]);
    // Commit size 0: the database is deleted but keeps its history.
    m.commit(&api, "v", 0, &[]);
    assert_eq!(m.pos.checksum.0, EMPTY_CHECKSUM);
    assert_eq!(api.pos("v"), Some(m.pos));
    let snap = api.snapshot("v");
    assert_eq!(snap.header.commit, 0);
    assert!(
        api.get("/db/snapshot", &[("db", "v"), ("format", "sqlite")])
            .ok()
            .body
            .is_empty()
    );
    // And recreated with another page size.
    m = Model {
        page_size: 1024,
        ..m
    };
    m.commit(&api, "v", 1, &[(1, page(1024, 5))]);
    assert_eq!(api.snapshot("v").header.page_size, 1024);
}

fn pages_at_positions_json_and_frames() {
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(4096);
    m.commit(
        &api,
        "p",
        3,
        &[(1, page(4096, 1)), (2, page(4096, 2)), (3, page(4096, 3))],
    );
    let p1 = m.pos;
    m.commit(&api, "p", 4, &[(2, page(4096, 22)), (4, page(4096, 4))]);
    let get = |pos: Pos, q: &[(&str, &str)]| {
        let ps = pos.to_string();
        let mut all = vec![("db", "p"), ("pos", ps.as_str())];
        all.extend_from_slice(q);
        api.get("/db/page", &all)
    };
    // Old position, comma list: page 4 is past that position's end and is left out.
    let r = get(p1, &[("pgno", "2,1,4")]).ok();
    assert_eq!(r.header("Litevfs-Page-Size").as_deref(), Some("4096"));
    // The size of the position read, as SQLite would take it from the file.
    assert_eq!(r.header("Litevfs-Db-Size").as_deref(), Some("3"));
    let cks =
        litevfs::wire::parse_page_checksums(&r.header("Litevfs-Page-Checksums").unwrap()).unwrap();
    assert_eq!(cks.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(cks[&2].0, ltx::page_checksum(2, &page(4096, 2)));
    assert_eq!(cks[&1].0, ltx::page_checksum(1, &page(4096, 1)));
    let pages: PagesResponse = r.json();
    let got: Vec<(u32, u8)> = pages.pages.iter().map(|p| (p.pgno, p.data[0])).collect();
    assert_eq!(got, vec![(2, 2), (1, 1)]);
    // New position, repeated params.
    let pages: PagesResponse = get(m.pos, &[("pgno", "2"), ("pgno", "4")]).ok().json();
    let got: Vec<(u32, u8)> = pages.pages.iter().map(|p| (p.pgno, p.data[0])).collect();
    assert_eq!(got, vec![(2, 22), (4, 4)]);
    // Binary frames.
    let ps = m.pos.to_string();
    let rb = api.req(
        reqwest::Method::GET,
        "/db/page",
        &[("db", "p"), ("pos", &ps), ("pgno", "3,2")],
    );
    let r = api.send(rb.header("Accept", MEDIA_PAGE_FRAMES)).ok();
    assert_eq!(r.header("content-type").as_deref(), Some(MEDIA_PAGE_FRAMES));
    let frames = decode_page_frames(&r.body).unwrap();
    let cks =
        litevfs::wire::parse_page_checksums(&r.header("Litevfs-Page-Checksums").unwrap()).unwrap();
    for f in &frames {
        assert_eq!(cks[&f.pgno].0, ltx::page_checksum(f.pgno, &f.data));
    }
    assert_eq!(
        frames
            .iter()
            .map(|p| (p.pgno, p.data[0], p.data.len()))
            .collect::<Vec<_>>(),
        vec![(3, 3, 4096), (2, 22, 4096)]
    );
    // First page past the end.
    get(m.pos, &[("pgno", "5,1")]).err(404, "ENOPAGE");
    // Positions the server cannot serve.
    for bad in [
        Pos::new(9, 0x8000000000000001),
        Pos::new(1, 0x8000000000000001),
        Pos::ZERO,
    ] {
        let e = get(bad, &[("pgno", "1")]).err(409, "EPOSMISMATCH");
        assert_eq!(e.pos, Some(m.pos));
    }
    // Malformed input.
    for bad in [
        "",
        "2/3",
        "0000000000000001",
        "0000000000000000/8000000000000001",
        "zz00000000000001/8000000000000001",
    ] {
        api.get("/db/page", &[("db", "p"), ("pos", bad), ("pgno", "1")])
            .err(400, "EBADPOS");
    }
    // Without `pos` (extension): the latest position, named in Litevfs-Pos, so a cold client
    // learns the position and page 1 in one request.
    let latest = api.get("/db/page", &[("db", "p"), ("pgno", "1,2")]).ok();
    assert_eq!(latest.header("Litevfs-Pos").as_deref(), Some(ps.as_str()));
    assert_eq!(latest.header("Litevfs-Db-Size").as_deref(), Some("4"));
    let got: PagesResponse = latest.json();
    assert_eq!(
        got.pages.iter().map(|p| p.pgno).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let at_pos = get(m.pos, &[("pgno", "1")]);
    assert_eq!(at_pos.header("Litevfs-Pos").as_deref(), Some(ps.as_str()));
    api.get("/db/page", &[("db", "nope"), ("pgno", "1")])
        .err(404, "ENODB");
    // A database created by a lease has no data: ENOTXID, not pages.
    api.post("/lease", &[("db", "leased-only")], vec![]).ok();
    api.get("/db/page", &[("db", "leased-only"), ("pgno", "1")])
        .err(404, "ENOTXID");
    for bad in ["0", "x", "1,,2", "-1", "4294967296"] {
        get(m.pos, &[("pgno", bad)]).err(400, "EINVALIDPGNO");
    }
    get(m.pos, &[]).err(400, "EINVALIDPGNO");
    api.get("/db/page", &[("db", "nope"), ("pos", &ps), ("pgno", "1")])
        .err(404, "ENODB");
}

fn page_replies_are_capped_in_bytes_first_page_always_sent() {
    // 300 pages of 64 KiB: asking for all of them gets the first 256 (16 MiB); the rest are
    // prefetch hints a reply may leave out.
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(65536);
    let changes: Vec<(u32, Vec<u8>)> = (1..=300).map(|p| (p, page(65536, p as u8))).collect();
    m.commit(&api, "wide", 300, &changes);
    let list = (1..=300)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let ps = m.pos.to_string();
    let rb = api.req(
        reqwest::Method::GET,
        "/db/page",
        &[("db", "wide"), ("pos", &ps), ("pgno", &list)],
    );
    let r = api.send(rb.header("Accept", MEDIA_PAGE_FRAMES)).ok();
    let frames = decode_page_frames(&r.body).unwrap();
    match server_support::backend() {
        server_support::Backend::Local => assert_eq!(frames.len(), 256),
        // With --store, hints ride along only as far as one range GET of the bucket reaches
        // (8 MiB here): never past the 16 MiB cap, never more than one GET per request.
        _ => assert!((128..=256).contains(&frames.len()), "{}", frames.len()),
    }
    assert_eq!(frames[0].pgno, 1);
    assert!(frames.iter().all(|f| f.data == page(65536, f.pgno as u8)));
}

fn bad_names_and_clusters() {
    let s = Server::start(&[]);
    let api = s.api();
    let (a, _, _) = vectors_abc();
    for bad in ["../x", "a/b", "..", ".hidden", "", "a b", "x\\y"] {
        api.tx(bad, a.clone()).err(400, "EBADDB");
        api.get("/db/snapshot", &[("db", bad)]).err(400, "EBADDB");
    }
    api.post("/db/tx", &[], a.clone()).err(400, "EBADDB");
    api.get("/pos", &[("cluster", "../etc")])
        .err(400, "EBADCLUSTER");
    // Clusters are namespaces.
    api.post("/db/tx", &[("db", "same"), ("cluster", "one")], a.clone())
        .ok();
    assert_eq!(api.get("/pos", &[("cluster", "two")]).ok().text(), "{}");
    assert!(
        api.get("/pos", &[("cluster", "one")])
            .ok()
            .text()
            .contains("same")
    );
    assert_eq!(api.positions().len(), 0, "default cluster is separate");
    let mut files: Vec<String> = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    // The store's own files (a local store's commit log among them).
    files.retain(|f| {
        !f.starts_with("store.db-")
            && !["objects", "BACKUP.lock", "commits.log"].contains(&f.as_str())
    });
    assert_eq!(
        files,
        ["LOCK", "store.db", "tmp"],
        "names never become paths"
    );
    // A local store's object files are named by number and nonce, never by a database.
    if let Ok(objects) = std::fs::read_dir(s.dir.join("objects")) {
        for f in objects {
            let name = f.unwrap().file_name().into_string().unwrap();
            let (id, nonce) = name.split_once('-').unwrap_or_else(|| panic!("{name}"));
            assert!(id.parse::<u64>().is_ok() && nonce.len() == 16, "{name}");
        }
    }
}

fn every_error_is_json() {
    let s = Server::start(&[]);
    let api = s.api();
    api.get("/nope", &[]).err(404, "ENOROUTE");
    api.get("/db/tx", &[("db", "a")]).err(405, "EMETHOD");
    api.delete("/pos", &[]).err(405, "EMETHOD");
    api.post("/healthz", &[], vec![]).err(405, "EMETHOD");
    api.get("/db/snapshot", &[("db", "missing")])
        .err(404, "ENODB");
    api.get("/db/snapshot", &[("db", "missing"), ("format", "zip")])
        .err(400, "EBADFORMAT");
    api.post("/sync", &[], b"{not json".to_vec())
        .err(400, "EBADINPUT");
    api.post(
        "/sync",
        &[],
        br#"{"positions":{"a":{"txid":"1","postApplyChecksum":"2"}}}"#.to_vec(),
    )
    .err(400, "EBADINPUT");
    api.post("/sync", &[], br#"{"positions":{"../a":{"txid":"0000000000000000","postApplyChecksum":"0000000000000000"}}}"#.to_vec())
        .err(400, "EBADDB");
    api.post(
        "/sync",
        &[("wait", "soon")],
        br#"{"positions":{}}"#.to_vec(),
    )
    .err(400, "EBADINPUT");
    let e: ErrorBody = api.get("/nope", &[]).json();
    assert!(e.pos.is_none());
    assert!(!api.get("/nope", &[]).text().contains("null"));
}

/// `--max-body-size` bounds transactions; a whole-database upload is never subject to it.
fn oversized_bodies_get_413() {
    let s = Server::start(&["--max-body-size", "64KiB"]);
    let api = s.api();
    let mut m = Model::new(4096);
    let pages: Vec<(u32, Vec<u8>)> = (1..=20).map(|p| (p, page(4096, p as u8))).collect();
    let (big, _) = m.tx(20, &pages);
    assert!(big.len() > 64 << 10);
    let e = api.tx("big", big).err(413, "ETOOLARGE");
    assert!(e.error.contains("65536 bytes"), "{}", e.error);
    assert_eq!(api.pos("big"), None);
    m.commit(&api, "big", 10, &pages[..10]);
    assert_eq!(api.pos("big"), Some(m.pos));
    let image = fake_sqlite(40);
    let r: TxidResponse = api
        .post("/db/upload", &[("db", "up")], image.clone())
        .ok()
        .json();
    assert_eq!(r.txid.0, 1);
    let back = api.get("/db/snapshot", &[("db", "up"), ("format", "sqlite")]);
    assert_eq!(back.ok().body, image);
}

fn info_healthz_metrics() {
    let s = Server::start(&[]);
    let api = s.api();
    let info: litevfs::wire::Info = api.get("/info", &[]).ok().json();
    let id = info.cluster_id.unwrap();
    assert!(
        id.len() == 20
            && id.starts_with("LFSC")
            && id[4..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()),
        "{id}"
    );
    let again: litevfs::wire::Info = api.get("/info", &[]).ok().json();
    assert_eq!(again.cluster_id.as_deref(), Some(id.as_str()));
    assert_eq!(api.get("/healthz", &[]).ok().text(), r#"{"status":"ok"}"#);
    let mut m = Model::new(512);
    m.commit(&api, "m", 2, &[(1, page(512, 1)), (2, page(512, 2))]);
    let ps = m.pos.to_string();
    api.get("/db/page", &[("db", "m"), ("pos", &ps), ("pgno", "1,2")])
        .ok();
    api.get("/db/page", &[("db", "m"), ("pos", &ps), ("pgno", "9")])
        .err(404, "ENOPAGE");
    api.post("/lease", &[("db", "m"), ("duration", "600000")], vec![])
        .ok();
    api.post("/lease", &[("db", "m")], vec![])
        .err(409, "ELEASEEXISTS");
    let text = api.get("/metrics", &[]).ok().text();
    for want in [
        "litevfs_http_requests_total{route=\"/db/page\",method=\"GET\",status=\"200\"} 1",
        "litevfs_http_requests_total{route=\"/db/page\",method=\"GET\",status=\"404\"} 1",
        "litevfs_http_requests_total{route=\"/db/tx\",method=\"POST\",status=\"200\"} 1",
        "litevfs_pages_served_total 2",
        "litevfs_page_bytes_served_total 1024",
        "litevfs_commits_total 1",
        "litevfs_lease_events_total{event=\"acquire\"} 1",
        "litevfs_lease_events_total{event=\"conflict\"} 1",
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }
}

/// Waits (bounded) until `/metrics` does, or with `present` false no longer does, contain
/// `line`; returns the text.
fn wait_for_metric(api: &server_support::Api, line: &str, present: bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = api.get("/metrics", &[]).ok().text();
        if text.lines().any(|l| l == line) == present {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/metrics never {} {line:?}:\n{text}",
            if present { "showed" } else { "dropped" }
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `GET /metrics` reports the bytes each database stores, its live pages and the history
/// retention keeps, as of the last compaction pass; a deleted database drops out.
fn metrics_report_bytes_per_database() {
    let s = Server::start(&["--compaction-interval", "50ms"]);
    let api = s.api();
    let mut m = Model::new(512);
    m.commit(&api, "m", 2, &[(1, page(512, 1)), (2, page(512, 2))]);
    m.commit(&api, "m", 2, &[(1, page(512, 3))]);
    api.post("/db/upload", &[("db", "u")], fake_sqlite(10)).ok();
    // Page 1 twice (its first version is retained history) and page 2: three of 512 bytes.
    let m_line = "litevfs_database_bytes{cluster=\"default\",db=\"m\"} 1536";
    let u_line = "litevfs_database_bytes{cluster=\"default\",db=\"u\"} 40960";
    wait_for_metric(&api, m_line, true);
    let text = wait_for_metric(&api, u_line, true);
    assert!(
        text.contains("# TYPE litevfs_database_bytes gauge"),
        "{text}"
    );
    api.delete("/db", &[("db", "u")]).ok();
    let text = wait_for_metric(&api, u_line, false);
    assert!(!text.contains("db=\"u\""), "{text}");
    assert!(text.lines().any(|l| l == m_line), "{text}");
}

/// Request methods are client-chosen (`FOO1`, `FOO2`, ...): counting each under its own label
/// would let anyone, without a token, grow the metrics table and `/metrics` without bound.
fn metrics_labels_stay_bounded_whatever_the_method() {
    let s = Server::start(&["--token", "t=c:rw"]);
    let anon = s.api();
    for i in 0..20 {
        let m = reqwest::Method::from_bytes(format!("FOO{i}").as_bytes()).unwrap();
        let path = if i % 2 == 0 { "/nowhere" } else { "/db/page" };
        let r = anon.send(anon.req(m, path, &[]));
        assert!(r.status == 404 || r.status == 405, "{}", r.text());
    }
    let text = anon.get("/metrics", &[]).ok().text();
    assert!(
        !text.contains("FOO"),
        "client methods became labels:\n{text}"
    );
    for want in [
        "litevfs_http_requests_total{route=\"unmatched\",method=\"other\",status=\"404\"} 10",
        "litevfs_http_requests_total{route=\"/db/page\",method=\"other\",status=\"405\"} 10",
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }
}

/// `GET /info` is a read: a read-only token (here one for every cluster) must not be able to
/// grow the store by asking for the ids of made-up clusters. Ids stay stable across restarts.
fn info_writes_nothing_and_ids_are_stable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--token", "ro=*:ro"];
    let ids = |s: &Server| -> Vec<String> {
        let api = s.api_with("ro");
        (0..20)
            .map(|i| {
                let c = format!("c{i}");
                let info: litevfs::wire::Info =
                    api.get("/info", &[("cluster", c.as_str())]).ok().json();
                info.cluster_id.unwrap()
            })
            .collect()
    };
    let s = Server::start_in(&data, &args);
    let first = ids(&s);
    s.kill9();
    let conn = rusqlite::Connection::open(data.join("store.db")).unwrap();
    let rows: i64 = conn
        .query_row(
            "SELECT count(*) FROM meta WHERE key LIKE 'cluster_id:%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    assert_eq!(
        rows, 0,
        "a read-only token wrote {rows} rows through GET /info"
    );
    let s = Server::start_in(&data, &args);
    assert_eq!(ids(&s), first, "cluster ids survive a restart");
    let mut unique = first.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), first.len(), "one id per cluster");
}

/// A refused request with a large body still gets its error reply: the server reads the unread
/// body (bounded) before answering, instead of closing with data unread, which resets the
/// connection under a client that is still sending.
fn refused_uploads_get_their_error_not_a_reset() {
    let s = Server::start(&["--token", "rw=default:rw", "--token", "ro=default:ro"]);
    let big = vec![7u8; 4 << 20];
    for _ in 0..3 {
        s.api_with("ro")
            .post("/db/upload", &[("db", "x")], big.clone())
            .err(403, "EFORBIDDEN");
        s.api_with("nope")
            .post("/db/tx", &[("db", "x")], big.clone())
            .err(401, "EINVALIDAUTH");
    }
    assert!(s.api_with("rw").positions().is_empty());
}

fn auth_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# comment\n\nfile-token=prod:rw\n").unwrap();
    let tf = file.to_str().unwrap();
    let s = Server::start(&[
        "--token",
        "rw-token=prod:rw",
        "--token",
        "ro token=prod:ro",
        "--token",
        "admin=*:rw",
        "--tokens-file",
        tf,
    ]);
    let (a, _, _) = vectors_abc();
    s.api().get("/pos", &[]).err(401, "EINVALIDAUTH");
    s.api_with("wrong")
        .get("/pos", &[])
        .err(401, "EINVALIDAUTH");
    s.api_with("cluster prod")
        .tx("a", a.clone())
        .err(401, "EINVALIDAUTH");
    let ro = s.api_with("ro token");
    assert_eq!(ro.get("/pos", &[]).ok().text(), "{}");
    ro.tx("a", a.clone()).err(403, "EFORBIDDEN");
    ro.post("/lease", &[("db", "a")], vec![])
        .err(403, "EFORBIDDEN");
    ro.post("/db/upload", &[("db", "a")], vec![])
        .err(403, "EFORBIDDEN");
    ro.delete("/db", &[("db", "a")]).err(403, "EFORBIDDEN");
    ro.post(
        "/db/restore",
        &[("db", "a"), ("txid", "0000000000000001")],
        vec![],
    )
    .err(403, "EFORBIDDEN");
    let rw = s.api_with("rw-token");
    rw.tx("a", a.clone()).ok();
    rw.get("/pos", &[("cluster", "other")])
        .err(403, "EFORBIDDEN");
    assert!(
        rw.get("/pos", &[("cluster", "prod")])
            .ok()
            .text()
            .contains("\"a\"")
    );
    assert!(
        s.api_with("file-token")
            .get("/pos", &[])
            .ok()
            .text()
            .contains("\"a\"")
    );
    assert!(ro.get("/db/snapshot", &[("db", "a")]).ok().body.len() > 100);
    let admin = s.api_with("admin");
    assert!(
        admin
            .get("/pos", &[("cluster", "prod")])
            .ok()
            .text()
            .contains("\"a\"")
    );
    assert_eq!(admin.get("/pos", &[]).ok().text(), "{}");
    // Unauthenticated service endpoints.
    s.api().get("/healthz", &[]).ok();
    s.api().get("/metrics", &[]).ok();
}

#[test]
fn refuses_anonymous_non_loopback_and_bad_flags() {
    let run = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("LITEVFS_TOKENS")
            .output()
            .unwrap()
    };
    let busy = Server::start(&[]);
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&busy.dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{second:?}"
    );
    busy.api().get("/healthz", &[]).ok();
    let out = run(&["--listen", "0.0.0.0:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
    assert!(out.stdout.is_empty());
    for bad in [
        ["--token", "nocluster"],
        ["--retention", "10x"],
        ["--max-body-size", "lots"],
    ] {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(&bad);
        assert!(!run(&args).status.success(), "{bad:?}");
    }
}

fn sigterm_shuts_down_gracefully() {
    let s = Server::start(&[]);
    let api = s.api();
    let (a, _, _) = vectors_abc();
    api.tx("a", a).ok();
    // A long-poll in flight must not hold the shutdown up.
    let poller = {
        let api = api.clone();
        std::thread::spawn(move || {
            let body = br#"{"positions":{"a":{"txid":"0000000000000001","postApplyChecksum":"e4e4aaa102377eee"}}}"#;
            api.try_send(
                api.req(reqwest::Method::POST, "/sync", &[("wait", "30000")])
                    .body(body.to_vec()),
            )
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let status = std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = s.wait();
    assert!(exit.success(), "{exit:?}");
    let r = poller
        .join()
        .unwrap()
        .expect("long-poll answered before exit");
    assert_eq!(r.status, 200);
}

#[test]
fn configuration_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("envdata");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"));
    cmd.arg("serve")
        .env("LITEVFS_DATA_DIR", &dir)
        .env("LITEVFS_LISTEN", "127.0.0.1:0")
        .env("LITEVFS_TOKENS", "t-rw=envc:rw,t-ro=envc:ro")
        .env("LITEVFS_RETENTION", "30s")
        .env("LITEVFS_MAX_BODY_SIZE", "1K")
        .env("LITEVFS_DELAY_MS", "5");
    let s = Server::spawn(cmd, &dir);
    assert!(dir.join("store.db").exists());
    s.api().get("/pos", &[]).err(401, "EINVALIDAUTH");
    s.api_with("t-ro").get("/pos", &[]).ok();
    let (a, _, _) = vectors_abc();
    s.api_with("t-ro").tx("a", a.clone()).err(403, "EFORBIDDEN");
    s.api_with("t-rw").tx("a", a.clone()).ok();
    let mut big = a;
    big.resize(2048, 0);
    s.api_with("t-rw")
        .post("/db/tx", &[("db", "b")], big)
        .err(413, "ETOOLARGE");
}

/// `warm=BYTES` on `GET /db/page` (our extension): the store adds the pages every cold reader
/// needs next, the schema and the interior b-tree pages, each with its checksum, never a leaf of
/// a data b-tree; local mode only (a bucket backend answers the pages asked for).
fn warm_open_adds_the_schema_and_interior_pages() {
    let s = Server::start(&[]);
    let api = s.api();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "create table t(id integer primary key, v blob);
         with recursive s(x) as (select 1 union all select x + 1 from s where x < 20000)
         insert into t select x, randomblob(150) from s;
         create index iv on t(v);",
    )
    .unwrap();
    drop(c);
    let get = |warm: &str| -> PagesResponse {
        api.get("/db/page", &[("db", "w"), ("pgno", "1"), ("warm", warm)])
            .ok()
            .json()
    };
    // The same position twice (the second from the store's memory of warm sets), then a new
    // position with more interior pages: each reply is the interior pages of its position.
    for round in 0..3 {
        if round == 2 {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "with recursive s(x) as (select 1 union all select x + 1 from s where x < 20000)
                 insert into t select 20000 + x, randomblob(150) from s;",
            )
            .unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        if round != 1 {
            api.post("/db/upload", &[("db", "w")], bytes.clone()).ok();
        }
        let page = |n: u32| &bytes[(n as usize - 1) * 4096..n as usize * 4096];
        let cold = get("0");
        assert_eq!(cold.pages.len(), 1);
        let warm = get("1048576");
        assert_eq!(warm.pages[0].pgno, 1);
        for p in &warm.pages[1..] {
            assert_eq!(p.data, page(p.pgno), "page {} as stored", p.pgno);
            assert!(
                litevfs::btree::is_interior(p.pgno, &p.data),
                "page {} is not interior",
                p.pgno
            );
        }
        match server_support::backend() {
            server_support::Backend::Local => {
                // Both roots, and every interior page of both b-trees (20,000 rows need 2
                // levels).
                let want: Vec<u32> = (1..=(bytes.len() / 4096) as u32)
                    .filter(|&n| n > 1 && litevfs::btree::is_interior(n, page(n)))
                    .collect();
                let mut got: Vec<u32> = warm.pages[1..].iter().map(|p| p.pgno).collect();
                got.sort_unstable();
                assert_eq!(got, want, "round {round}");
                // A budget of two pages brings two: the roots come first.
                let two = get("8192");
                assert_eq!(two.pages.len(), 3);
            }
            _ => assert_eq!(warm.pages.len(), 1),
        }
    }
    api.get("/db/page", &[("db", "w"), ("pgno", "1"), ("warm", "lots")])
        .err(400, "EBADINPUT");
}

// Every test above that is not a `#[test]` itself runs once per backend: local store.db,
// `--store file://`, `--store s3://` on moto. Flag parsing and the environment are tested once.
on_every_backend!(
    pos_lists_databases_with_exact_json,
    lz4_and_lfsb_vectors_are_accepted,
    fake_snapshot_checksum_is_rejected,
    contiguity_rules_and_pos_mismatch_body,
    bad_ltx_changes_nothing,
    txid_space_exhausted_is_refused_by_upload_and_restore,
    shrink_and_delete,
    pages_at_positions_json_and_frames,
    page_replies_are_capped_in_bytes_first_page_always_sent,
    warm_open_adds_the_schema_and_interior_pages,
    bad_names_and_clusters,
    every_error_is_json,
    oversized_bodies_get_413,
    info_healthz_metrics,
    metrics_report_bytes_per_database,
    metrics_labels_stay_bounded_whatever_the_method,
    info_writes_nothing_and_ids_are_stable,
    refused_uploads_get_their_error_not_a_reset,
    auth_tokens,
    sigterm_shuts_down_gracefully,
);
