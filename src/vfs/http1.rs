//! A minimal HTTP/1.1 client for the commit upload (`POST /db/tx`) to a plain `http://` store.
//!
//! Why it exists: reqwest's blocking client runs every request on its own runtime thread and
//! hands the reply back over a channel (two thread wake-ups per request), and it sends a body
//! in writes of its own after the head (the store wakes once more to read it). A commit is one
//! request per transaction on the caller's critical path, so this client writes the head and
//! (up to [`COALESCE`] bytes of) the body in one write from the caller's thread and reads the
//! reply there. Measured on the 2-core test machine: about 2.5 fewer context switches per
//! commit on the store and no hand-off on the client.
//!
//! Invariant: a request is sent at most once. A failure after the request may have reached the
//! store is returned as it is, for the caller's lost-reply handling to settle; only idle
//! connections the store has already closed are discarded before use. A connection goes back
//! to the pool only after a complete, well-formed reply that did not ask to close it.
//!
//! Does not do TLS, proxies, redirects or compression: [`Http1::for_url`] declines any URL
//! or environment where one of those may apply, and the caller uses reqwest instead.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use reqwest::Url;

use super::spill::SpillBuf;

/// Body bytes written together with the head; larger bodies follow through the same buffer.
const COALESCE: usize = 64 << 10;
/// Largest reply head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Largest reply body accepted (replies to an upload are an empty body or a JSON error).
const MAX_BODY: usize = 1 << 20;
/// How long a reply is waited for after a send the store cut off.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);
/// Idle connections kept, and for how long (below the store's `--header-timeout`, 120 s by
/// default, like the reqwest pool's 60 s).
const MAX_IDLE: usize = 4;
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Environment variables that make reqwest send plain-HTTP requests through a proxy.
const PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];

/// A reply: status and body (headers other than framing are not needed by the caller).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Keep-alive connections to one `http://` origin.
pub struct Http1 {
    user_agent: &'static str,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Http1 {
    /// A client for `base`, or `None` when reqwest must handle it: not `http`, or a proxy is
    /// configured in the environment.
    pub fn for_url(base: &Url, user_agent: &'static str) -> Option<Http1> {
        let proxied = PROXY_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if base.scheme() != "http" || base.host_str().is_none() || proxied {
            return None;
        }
        Some(Http1 {
            user_agent,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// `POST url` with `headers` (names and values already valid) and `body`, all within
    /// `timeout` (`connect` bounds establishing a new connection).
    pub fn post(
        &self,
        url: &Url,
        headers: &[(&str, &str)],
        body: &SpillBuf,
        timeout: Duration,
        connect: Duration,
    ) -> io::Result<Reply> {
        let deadline = Instant::now() + timeout;
        let stream = match self.pooled() {
            Some(s) => s,
            None => connect_to(url, connect, deadline)?,
        };
        let mut conn = Deadlined {
            stream: &stream,
            deadline,
        };
        if let Err(e) = send(&mut conn, url, self.user_agent, headers, body) {
            // The store may have refused the request before taking all of the body (413 over
            // its size limit) and closed the connection: its reply says why, the broken send
            // does not. Never sent again either way.
            let short = Instant::now() + REFUSAL_WAIT;
            let reader = Deadlined {
                stream: &stream,
                deadline: deadline.min(short),
            };
            return match read_reply(&mut BufReader::new(reader)) {
                Ok((reply, _)) => Ok(reply),
                Err(_) => Err(e),
            };
        }
        let mut reader = BufReader::new(conn);
        let (reply, reusable) = read_reply(&mut reader)?;
        let clean = reusable && reader.buffer().is_empty();
        drop(reader);
        if clean {
            self.put_back(stream);
        }
        Ok(reply)
    }

    /// The most recently used idle connection that is still open.
    fn pooled(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock();
        while let Some((s, since)) = idle.pop() {
            if since.elapsed() < IDLE_FOR && still_open(&s) {
                return Some(s);
            }
        }
        None
    }

    fn put_back(&self, s: TcpStream) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
    }
}

/// Whether an idle connection can carry a request: the peer has neither closed it nor sent
/// anything (an unsolicited byte means the stream is out of step). One non-blocking peek
/// (`MSG_DONTWAIT`), so the socket stays blocking and no mode switch costs two more calls.
fn still_open(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: the descriptor belongs to `s`, which outlives the call; the buffer is one valid,
    // writable byte, and its length says so.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "operation timed out")
}

fn connect_to(url: &Url, connect: Duration, deadline: Instant) -> io::Result<TcpStream> {
    let addrs = url.socket_addrs(|| None)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        match TcpStream::connect_timeout(&addr, connect.min(left)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = io::Error::new(e.kind(), format!("connecting to {addr}: {e}")),
        }
    }
    Err(last)
}

/// A stream whose every read and write ends by `deadline`.
struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        Ok(left)
    }

    /// A socket timeout hit is the deadline passing.
    fn map(e: io::Error) -> io::Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
            _ => e,
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.read(buf).map_err(Self::map)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.write(buf).map_err(Self::map)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the request: the head and the start of the body in one write.
fn send(
    conn: &mut Deadlined<'_>,
    url: &Url,
    user_agent: &str,
    headers: &[(&str, &str)],
    body: &SpillBuf,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(COALESCE, conn);
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let host = url.host_str().unwrap_or_default();
    write!(w, "POST {target} HTTP/1.1\r\nhost: {host}")?;
    if let Some(port) = url.port() {
        write!(w, ":{port}")?;
    }
    write!(w, "\r\nuser-agent: {user_agent}\r\naccept: */*\r\n")?;
    for (name, value) in headers {
        write!(w, "{name}: {value}\r\n")?;
    }
    write!(w, "content-length: {}\r\n\r\n", body.len())?;
    body.write_to(&mut w)?;
    w.flush()
}

fn malformed(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// How a reply body is delimited.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads one reply (skipping interim 1xx heads); returns it and whether the connection can
/// carry another request.
fn read_reply(r: &mut impl BufRead) -> io::Result<(Reply, bool)> {
    loop {
        let (status, framing, mut reusable) = read_head(r)?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = match framing {
            Framing::Length(n) if n > MAX_BODY => return Err(malformed("reply body too large")),
            Framing::Length(n) => {
                let mut body = vec![0u8; n];
                r.read_exact(&mut body)?;
                body
            }
            Framing::Chunked => read_chunked(r)?,
            Framing::UntilClose => {
                reusable = false;
                let mut body = Vec::new();
                r.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
                if body.len() > MAX_BODY {
                    return Err(malformed("reply body too large"));
                }
                body
            }
        };
        return Ok((Reply { status, body }, reusable));
    }
}

/// One CRLF-terminated line, without the line end; counts against `budget`.
fn line(r: &mut impl BufRead, budget: &mut usize) -> io::Result<String> {
    let mut buf = Vec::new();
    let n = r.take(*budget as u64).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a complete reply",
        ));
    }
    if buf.last() != Some(&b'\n') {
        return Err(malformed("reply head too long or cut off"));
    }
    *budget -= n;
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| malformed("reply head is not text"))
}

/// The status line and headers: status, body framing, keep-alive.
fn read_head(r: &mut impl BufRead) -> io::Result<(u16, Framing, bool)> {
    let mut budget = MAX_HEAD;
    let status_line = line(r, &mut budget)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;
    let mut reusable = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(malformed(format!("bad status line {status_line:?}"))),
    };
    let (mut length, mut chunked) = (None, false);
    loop {
        let h = line(r, &mut budget)?;
        if h.is_empty() {
            break;
        }
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| malformed(format!("bad header line {h:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| malformed(format!("bad content-length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("conflicting content-length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                reusable = false;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let close = value
                .split(',')
                .any(|v| v.trim().eq_ignore_ascii_case("close"));
            reusable &= !close;
        }
    }
    let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok((status, framing, reusable))
}

/// A chunked body, trailers skipped.
fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        let size_line = line(r, &mut budget)?;
        let size = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| malformed(format!("bad chunk size {size_line:?}")))?;
        if size == 0 {
            while !line(r, &mut budget)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(malformed("reply body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        if !line(r, &mut budget)?.is_empty() {
            return Err(malformed("chunk longer than its size"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::spill::SpillConfig;
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// Reads one request (head and `content-length` body) and returns its body.
    fn serve_one(r: &mut BufReader<TcpStream>) -> Vec<u8> {
        let mut len = 0;
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            if l == "\r\n" {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        r.get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
        body
    }

    /// Two requests share a connection; once the server closes it while idle, the next request
    /// goes out on a new one instead of failing.
    #[test]
    fn reuses_connections_and_replaces_one_closed_while_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!(
            "http://{}/db/tx?db=a",
            listener.local_addr().unwrap()
        ))
        .unwrap();
        let (closed_tx, closed_rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let mut first = BufReader::new(listener.accept().unwrap().0);
            let bodies = [serve_one(&mut first), serve_one(&mut first)];
            drop(first);
            closed_tx.send(()).unwrap();
            let mut second = BufReader::new(listener.accept().unwrap().0);
            (bodies, serve_one(&mut second))
        });
        let dir = tempfile::tempdir().unwrap();
        let mut body = SpillBuf::new(SpillConfig {
            dir: dir.path().to_path_buf(),
            limit: 1 << 20,
        });
        body.append(b"ltx").unwrap();
        let Some(client) = Http1::for_url(&url, "test") else {
            return; // a proxy in the environment: the direct path is not used
        };
        let t = Duration::from_secs(10);
        for _ in 0..2 {
            let r = client.post(&url, &[("x-h", "v")], &body, t, t).unwrap();
            assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        }
        closed_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let r = client.post(&url, &[], &body, t, t).unwrap();
        assert_eq!(r.status, 200);
        let (bodies, last) = server.join().unwrap();
        assert_eq!(
            (bodies, last),
            ([b"ltx".to_vec(), b"ltx".to_vec()], b"ltx".to_vec())
        );
    }

    /// An idle connection is usable while the peer is silent, and not once it sent a byte or
    /// closed; checking leaves the socket blocking.
    #[test]
    fn still_open_tells_idle_from_closed_or_out_of_step() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        assert!(still_open(&client));
        assert!(still_open(&client), "a check consumes nothing");
        peer.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!still_open(&client));
        let mut byte = [0u8; 1];
        (&client).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x", "the peeked byte is still there, read blocking");
        drop(peer);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!still_open(&client));
    }

    /// A store that refuses a body it did not read (413) and closes: the caller gets the 413,
    /// not a broken connection.
    #[test]
    fn a_refusal_before_the_body_is_read_is_reported_as_such() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!(
            "http://{}/db/tx?db=a",
            listener.local_addr().unwrap()
        ))
        .unwrap();
        let server = std::thread::spawn(move || {
            let mut r = BufReader::new(listener.accept().unwrap().0);
            loop {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                if l == "\r\n" {
                    break;
                }
            }
            let msg = br#"{"code":"ETOOLARGE","error":"request body exceeds the limit"}"#;
            let head = format!(
                "HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                msg.len()
            );
            let s = r.get_mut();
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(msg).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            // Read a little of the body, then close without reading the rest.
            let mut some = vec![0u8; 1 << 16];
            let _ = r.read(&mut some);
            std::thread::sleep(Duration::from_millis(100));
        });
        let dir = tempfile::tempdir().unwrap();
        let mut body = SpillBuf::new(SpillConfig {
            dir: dir.path().to_path_buf(),
            limit: 1 << 20,
        });
        for _ in 0..64 {
            body.append(&vec![7u8; 1 << 20]).unwrap();
        }
        let Some(client) = Http1::for_url(&url, "test") else {
            return; // a proxy in the environment: the direct path is not used
        };
        let t = Duration::from_secs(10);
        let r = client.post(&url, &[], &body, t, t).unwrap();
        assert_eq!(r.status, 413);
        assert!(String::from_utf8_lossy(&r.body).contains("ETOOLARGE"));
        server.join().unwrap();
    }

    fn reply(raw: &str) -> io::Result<(Reply, bool)> {
        read_reply(&mut io::Cursor::new(raw.as_bytes().to_vec()))
    }

    #[test]
    fn reads_length_chunked_and_close_delimited_replies() {
        let (r, keep) = reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").unwrap();
        assert_eq!((r.status, r.body.as_slice(), keep), (200, &b"hi"[..], true));
        let raw = "HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\nT: 1\r\n\r\n";
        let (r, keep) = reply(raw).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (409, &b"abcd"[..], true)
        );
        let (r, keep) = reply("HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nall of it").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (500, &b"all of it"[..], false)
        );
        let raw = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (r, keep) = reply(raw).unwrap();
        assert_eq!((r.status, keep), (200, false));
    }

    #[test]
    fn refuses_garbled_or_cut_off_replies() {
        for raw in [
            "",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab",
            "HTTP/1.1 2x OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n",
        ] {
            assert!(reply(raw).is_err(), "{raw:?}");
        }
    }
}
