//! Child processes for the xtask: running commands with checked exits, the page store as a
//! child, and an interactive `sqlite3` shell driven over pipes.
//!
//! Every child started here is killed when its guard drops, so a failing step never leaves a
//! server or shell behind.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// An xtask failure: one line saying what went wrong.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(e.to_string())
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a command to completion with inherited output; fails unless it exits 0.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<(), Error> {
    let status = cmd
        .status()
        .map_err(|e| Error(format!("{what}: cannot start: {e}")))?;
    if !status.success() {
        return Err(Error(format!("{what} failed ({status})")));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails with its stderr unless it exits 0.
pub fn output_checked(cmd: &mut Command, what: &str) -> Result<String, Error> {
    let out = cmd
        .output()
        .map_err(|e| Error(format!("{what}: cannot start: {e}")))?;
    if !out.status.success() {
        return Err(Error(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running `litevfs serve`, killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
}

const READY_PREFIX: &str = "litevfs serve: listening on ";

impl Server {
    /// Starts the page store on a free loopback port and waits for its ready line.
    pub fn start(bin: &Path, data_dir: &Path, extra: &[&str]) -> Result<Server, Error> {
        Server::start_at(bin, data_dir, "127.0.0.1:0", extra, Stdio::inherit())
    }

    /// Starts the page store on `listen` (a loopback address), its stderr going to `stderr`.
    pub fn start_at(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        stderr: Stdio,
    ) -> Result<Server, Error> {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error(format!("cannot start {}: {e}", bin.display())))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix(READY_PREFIX) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(url) => Ok(Server { child, url }),
            Err(_) => {
                let _ = child.kill();
                Err(Error(
                    "litevfs serve did not report it was listening within 20 s".into(),
                ))
            }
        }
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process ended by itself (a crash), with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An interactive `sqlite3` shell over pipes. Each [`Shell::exec`] sends SQL and dot-commands
/// and returns what the shell printed for them (stdout and stderr interleaved in order).
pub struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

const END_MARK: &str = "--xtask-end-of-batch--";

impl Shell {
    pub fn start(envs: &[(String, String)]) -> Result<Shell, Error> {
        let mut cmd = Command::new("sqlite3");
        cmd.arg("-batch")
            .arg("-bail")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error(format!("cannot start sqlite3: {e}")))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let (tx, rx) = mpsc::channel();
        forward_lines(child.stdout.take().expect("piped stdout"), tx.clone());
        forward_lines(child.stderr.take().expect("piped stderr"), tx);
        Ok(Shell {
            child,
            stdin,
            lines: rx,
        })
    }

    /// Runs `script` and returns its output. Fails if the shell reports an error or exits.
    pub fn exec(&mut self, script: &str) -> Result<String, Error> {
        writeln!(self.stdin, "{script}\n.print {END_MARK}")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == END_MARK => break,
                Ok(line) => {
                    out.push_str(&line);
                    out.push('\n');
                }
                Err(_) => {
                    return Err(Error(format!(
                        "sqlite3 stopped or hung while running:\n{script}\noutput so far:\n{out}"
                    )));
                }
            }
        }
        if out.lines().any(|l| {
            l.starts_with("Error") || l.starts_with("Parse error") || l.starts_with("Runtime error")
        }) {
            return Err(Error(format!(
                "sqlite3 reported an error running:\n{script}\n{out}"
            )));
        }
        Ok(out)
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends each line of `r` to `tx` from a background thread until EOF.
pub fn forward_lines(r: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Server {
    /// The server's process id (the benchmark harness reads its peak RSS from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
