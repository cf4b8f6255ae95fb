//! A TCP proxy on loopback between a server and its object store, for the faults that cannot
//! be produced for real on one machine: the store unreachable (connections refused) and replies
//! lost after the request went through.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with connections.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Up,
    /// Not listening: connections are refused; open ones are cut.
    Refuse,
    /// Forwards everything, except that the reply to a commit (a `PUT` of an `l0/` object) is
    /// dropped and the connection closed: the commit lands, its reply never arrives.
    LoseCommitReplies,
    /// Forwards everything but the conditions of writes (`If-None-Match`, `If-Match` request
    /// headers): an S3-compatible service that ignores them.
    StripConditions,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Mode::Up => 0,
            Mode::Refuse => 1,
            Mode::LoseCommitReplies => 2,
            Mode::StripConditions => 3,
        }
    }

    fn of(c: u8) -> Mode {
        match c {
            1 => Mode::Refuse,
            2 => Mode::LoseCommitReplies,
            3 => Mode::StripConditions,
            _ => Mode::Up,
        }
    }
}

/// A running proxy; stops with the process.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Proxies connections to `upstream` (host:port).
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(AtomicU8::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, o, up) = (mode.clone(), open.clone(), upstream.to_string());
        std::thread::spawn(move || accept_loop(listener, addr, m, o, up));
        Proxy { addr, mode, open }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode.code(), Ordering::SeqCst);
        if mode != Mode::Up {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    upstream: String,
) {
    let mut listener = Some(listener);
    loop {
        let m = Mode::of(mode.load(Ordering::SeqCst));
        if m == Mode::Refuse {
            // Stop listening, so connecting fails at once (connection refused).
            listener = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => match TcpListener::bind(addr) {
                Ok(l) => listener.insert(l),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        l.set_nonblocking(true).expect("nonblocking");
        match l.accept() {
            Ok((client, _)) => {
                client.set_nonblocking(false).expect("blocking");
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut o = open.lock().unwrap();
                o.push(client.try_clone().expect("clone"));
                o.push(server.try_clone().expect("clone"));
                drop(o);
                let lose = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (m2, l2) = (mode.clone(), lose.clone());
                std::thread::spawn(move || pump_requests(client, server, m2, l2));
                std::thread::spawn(move || pump_replies(s2, c2, lose));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Copies requests to the upstream; notes when one is a commit whose reply must be lost.
fn pump_requests(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: Arc<AtomicU8>,
    lose: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = [0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let head = String::from_utf8_lossy(&buf[..n.min(512)]);
        if Mode::of(mode.load(Ordering::SeqCst)) == Mode::LoseCommitReplies
            && head.starts_with("PUT ")
            && head.lines().next().is_some_and(|l| l.contains("/l0/"))
        {
            lose.store(true, Ordering::SeqCst);
        }
        let out = if Mode::of(mode.load(Ordering::SeqCst)) == Mode::StripConditions {
            strip_conditions(&buf[..n])
        } else {
            buf[..n].to_vec()
        };
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Drops `If-None-Match` and `If-Match` header lines from a chunk that holds a request head.
fn strip_conditions(chunk: &[u8]) -> Vec<u8> {
    let Some(end) = chunk.windows(4).position(|w| w == b"\r\n\r\n") else {
        return chunk.to_vec();
    };
    let head = String::from_utf8_lossy(&chunk[..end]);
    let kept: Vec<&str> = head
        .split("\r\n")
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.starts_with("if-none-match:") && !l.starts_with("if-match:")
        })
        .collect();
    let mut out = kept.join("\r\n").into_bytes();
    out.extend_from_slice(&chunk[end..]);
    out
}

/// Copies replies back, unless the request was a commit whose reply is to be lost: then both
/// connections are closed instead.
fn pump_replies(mut from: TcpStream, mut to: TcpStream, lose: Arc<std::sync::atomic::AtomicBool>) {
    let mut buf = [0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if lose.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
