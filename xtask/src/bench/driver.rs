//! Talking to `examples/bench_driver`, the measuring process: one-shot invocations and
//! interactive sessions (commands on its stdin, one `ok key=value ...` or `err MESSAGE` line per
//! command on its stdout, event lines before it for streaming commands).
//!
//! Owns process handling and parsing of the driver's answers; every session is killed when it
//! drops. It does not interpret the numbers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::proc::{Error, forward_lines};

/// One `ok` answer: its key=value pairs, in order.
#[derive(Clone, Debug, Default)]
pub struct Reply(pub Vec<(String, String)>);

impl Reply {
    pub fn parse(line: &str) -> Result<Reply, Error> {
        let rest = match line.strip_prefix("ok") {
            Some(r) => r,
            None => return Err(Error(line.strip_prefix("err ").unwrap_or(line).to_string())),
        };
        let pairs = rest
            .split_whitespace()
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Reply(pairs))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The number under `key`; an error naming the key otherwise.
    pub fn num(&self, key: &str) -> Result<f64, Error> {
        self.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| {
            Error(format!(
                "driver answer has no number {key}: {}",
                self.text()
            ))
        })
    }

    /// The first numeric value whose key contains one of `needles` (case-insensitive), tried in
    /// order: adapts to the exact key names of `PRAGMA litevfs_cache_stats`.
    pub fn find_num(&self, needles: &[&str]) -> Option<f64> {
        needles.iter().find_map(|n| {
            self.0
                .iter()
                .filter(|(k, _)| k.to_ascii_lowercase().contains(n))
                .find_map(|(_, v)| v.parse::<f64>().ok())
        })
    }

    pub fn text(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How to run the driver: its path, the extension, and the environment of litevfs sessions.
#[derive(Clone)]
pub struct Driver {
    pub bin: PathBuf,
    pub ext: PathBuf,
}

impl Driver {
    /// Runs `bench_driver ARGS` to completion and parses its single answer.
    pub fn once(&self, args: &[&str]) -> Result<Reply, Error> {
        let what = format!("bench_driver {}", args.join(" "));
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).env("RUST_LOG", "warn");
        let out = run_timeout(&mut cmd, &what, ONCE_TIMEOUT)?;
        eprint!("{}", out.stderr);
        let last = out
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("ok") || l.starts_with("err"));
        match last {
            Some(l) => Reply::parse(l).map_err(|e| Error(format!("{what}: {e}"))),
            None => Err(Error(format!("{what}: no answer ({})", out.status))),
        }
    }

    /// A session on the local file `path` with plain SQLite.
    pub fn plain(&self, path: &Path) -> Result<(Session, Reply), Error> {
        Session::start(
            &self.bin,
            &["session", "plain", &path.to_string_lossy()],
            &[],
            "plain",
        )
    }

    /// A session on database `name` through liblitevfs.so, page store `url`, cache in `cache`.
    pub fn litevfs(&self, name: &str, url: &str, cache: &Path) -> Result<(Session, Reply), Error> {
        let env = [
            ("LITEFS_CLOUD_HOST", url.to_string()),
            ("LITEVFS_CACHE_DIR", cache.to_string_lossy().into()),
        ];
        let ext = self.ext.to_string_lossy();
        Session::start(
            &self.bin,
            &["session", "litevfs", name, &ext],
            &env,
            "litevfs",
        )
    }
}

/// A running `bench_driver session`, killed on drop.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pub what: &'static str,
}

/// Longest wait for one session command; the longest (100k lookups, filling a cache) take
/// seconds, so this only catches hangs.
const TIMEOUT: Duration = Duration::from_secs(180);
/// Longest one-shot driver run (generating or downloading 1.2 GB takes about 10 s).
const ONCE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished command printed.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with its output captured; kills it after `limit`.
pub fn run_timeout(cmd: &mut Command, what: &str, limit: Duration) -> Result<Output, Error> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error(format!("{what}: cannot start: {e}")))?;
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let err = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error(format!(
                "{what}: no result after {} s; killed",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

impl Session {
    fn start(
        bin: &Path,
        args: &[&str],
        env: &[(&str, String)],
        what: &'static str,
    ) -> Result<(Session, Reply), Error> {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error(format!("cannot start {}: {e}", bin.display())))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        forward_lines(stdout, tx);
        let mut s = Session {
            child,
            stdin,
            lines: rx,
            what,
        };
        let (_, open) = s
            .answer(Duration::from_secs(120))
            .map_err(|e| Error(format!("{what}: open: {}", e.0)))?;
        Ok((s, open))
    }

    /// Sends one command without waiting for its answer.
    pub fn send(&mut self, cmd: &str) -> Result<(), Error> {
        writeln!(self.stdin, "{cmd}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| Error(format!("{}: driver gone ({e})", self.what)))
    }

    /// The next line, event or answer.
    pub fn line(&mut self, timeout: Duration) -> Result<String, Error> {
        self.lines
            .recv_timeout(timeout)
            .map_err(|_| Error(format!("{}: driver exited or hung", self.what)))
    }

    /// Waits for the answer to the last command; returns the event lines before it too.
    pub fn answer(&mut self, timeout: Duration) -> Result<(Vec<String>, Reply), Error> {
        let mut events = Vec::new();
        loop {
            let l = self.line(timeout)?;
            if l.starts_with("ok") || l.starts_with("err") {
                let r = Reply::parse(&l).map_err(|e| Error(format!("{}: {}", self.what, e.0)))?;
                return Ok((events, r));
            }
            events.push(l);
        }
    }

    /// Sends `cmd` and waits for its answer.
    pub fn cmd(&mut self, cmd: &str) -> Result<Reply, Error> {
        self.send(cmd)?;
        self.answer(TIMEOUT)
            .map(|(_, r)| r)
            .map_err(|e| Error(format!("{} ({cmd})", e.0)))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One litevfs session that may fail without stopping the plain side: the first error is kept,
/// the session dropped, and later steps are skipped.
pub struct Side {
    pub s: Option<Session>,
    pub err: Option<Error>,
}

impl Side {
    /// A side that never ran, with the reason.
    pub fn off(why: &str) -> Side {
        Side {
            s: None,
            err: Some(Error(format!("not run: {why}"))),
        }
    }

    pub fn from(r: Result<(Session, Reply), Error>) -> Side {
        match r {
            Ok((s, _)) => Side {
                s: Some(s),
                err: None,
            },
            Err(e) => Side {
                s: None,
                err: Some(e),
            },
        }
    }

    /// Runs `f` on the session if it is still alive; keeps the first error.
    pub fn run<T>(&mut self, f: impl FnOnce(&mut Session) -> Result<T, Error>) -> Option<T> {
        let s = self.s.as_mut()?;
        match f(s) {
            Ok(v) => Some(v),
            Err(e) => {
                self.err = Some(e);
                self.s = None;
                None
            }
        }
    }

    /// Sends `cmd` and returns the number under `key` of its answer.
    pub fn num(&mut self, cmd: &str, key: &str) -> Option<f64> {
        self.run(|s| s.cmd(cmd)?.num(key))
    }
}

#[cfg(test)]
mod tests {
    use super::Reply;

    #[test]
    fn parses_answers() {
        let r = Reply::parse("ok ms=1.5 cache_requests=7 bytes_fetched=4096").unwrap();
        assert_eq!(r.num("ms").unwrap(), 1.5);
        assert_eq!(r.find_num(&["request"]), Some(7.0));
        assert_eq!(r.find_num(&["nothing", "bytes"]), Some(4096.0));
        assert_eq!(
            Reply::parse("err no such table: t").unwrap_err().0,
            "no such table: t"
        );
    }
}
