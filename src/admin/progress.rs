//! The progress line of `import`, `export` and `copy`: bytes done, total, rate and time left,
//! redrawn in place on stderr.
//!
//! Shown only when stderr is a terminal and `--quiet` was not given: a script, a pipe or a log
//! file gets nothing from here (the commands' result lines go to stdout either way). Drawing
//! never fails a transfer: write errors on stderr are ignored.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Least time between two redraws.
const REDRAW: Duration = Duration::from_millis(200);
/// The rate is measured over this much recent time, so it follows changes in throughput.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// One transfer's progress line.
pub struct Progress {
    /// `None`: quiet (not a terminal, or `--quiet`).
    out: Option<std::io::Stderr>,
    label: String,
    total: Option<u64>,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
    /// Recent (time, bytes done) samples, oldest first.
    samples: VecDeque<(Instant, u64)>,
    /// Whether a line is drawn and not yet ended with a newline.
    open: bool,
}

impl Progress {
    /// A progress line for `label` (e.g. `import app`) of `total` bytes, if known. `quiet`
    /// silences it; so does a stderr that is not a terminal.
    pub fn new(label: impl Into<String>, total: Option<u64>, quiet: bool) -> Progress {
        let err = std::io::stderr();
        let out = (!quiet && err.is_terminal()).then_some(err);
        Progress::with_output(out, label.into(), total)
    }

    fn with_output(out: Option<std::io::Stderr>, label: String, total: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            out,
            label,
            total,
            done: 0,
            start: now,
            last_draw: None,
            samples: VecDeque::from([(now, 0)]),
            open: false,
        }
    }

    /// Bytes transferred so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Counts `n` more bytes, redrawing at most every [`REDRAW`].
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.out.is_none() {
            return;
        }
        let now = Instant::now();
        if self.last_draw.is_some_and(|t| now - t < REDRAW) {
            return;
        }
        self.samples.push_back((now, self.done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - *t > RATE_WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
        let line = self.line(now);
        self.draw(&line, false);
        self.last_draw = Some(now);
    }

    /// Ends the byte count with a summary line (total and average rate), then `then` if given
    /// (e.g. what happens next: "waiting for the store to commit it").
    pub fn finish(&mut self, then: Option<&str>) {
        if self.out.is_none() {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let mut line = format!(
            "{}: {} in {}",
            self.label,
            bytes(self.done),
            duration(self.start.elapsed())
        );
        if secs > 0.0 {
            line.push_str(&format!(" ({}/s)", bytes((self.done as f64 / secs) as u64)));
        }
        if let Some(t) = then {
            line.push_str("; ");
            line.push_str(t);
        }
        self.draw(&line, true);
    }

    /// Prints a one-line note about the transfer (a phase it enters).
    pub fn note(&mut self, msg: &str) {
        if self.out.is_some() {
            let line = format!("{}: {msg}", self.label);
            self.draw(&line, true);
        }
    }

    /// The current state: `import app: 1.20 GiB of 3.00 GiB (40%), 45.3 MiB/s, 0:41 left`.
    fn line(&self, now: Instant) -> String {
        let mut s = format!("{}: {}", self.label, bytes(self.done));
        if let Some(total) = self.total.filter(|&t| t > 0) {
            let pct = (self.done.min(total) as f64 * 100.0 / total as f64) as u32;
            s.push_str(&format!(" of {} ({pct}%)", bytes(total)));
        }
        let (t0, b0) = *self.samples.front().expect("never empty");
        let secs = (now - t0).as_secs_f64();
        if secs >= 0.5 {
            let rate = (self.done - b0) as f64 / secs;
            s.push_str(&format!(", {}/s", bytes(rate as u64)));
            if let (Some(total), true) = (self.total, rate >= 1.0) {
                let left = total.saturating_sub(self.done) as f64 / rate;
                s.push_str(&format!(
                    ", {} left",
                    duration(Duration::from_secs_f64(left))
                ));
            }
        }
        s
    }

    /// Replaces the current line with `line` (erasing what was there), ending it if `end`.
    fn draw(&mut self, line: &str, end: bool) {
        if let Some(out) = &self.out {
            let mut out = out.lock();
            let nl = if end { "\n" } else { "" };
            // \r back to column 0, ESC[K erases the rest of the previous, longer line.
            let _ = write!(out, "\r{line}\x1b[K{nl}");
            let _ = out.flush();
        }
        self.open = !end;
    }
}

impl Drop for Progress {
    /// A transfer that ended in an error leaves the line as it was; the error goes below it.
    fn drop(&mut self) {
        if self.open
            && let Some(out) = &self.out
        {
            let _ = writeln!(out.lock());
        }
    }
}

/// `1023 B`, `1.5 KiB`, `45.3 MiB`, `3.00 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let prec = if v < 10.0 { 2 } else { 1 };
    format!("{v:.prec$} {}", UNITS[unit])
}

/// `0:07`, `12:30`, `1:02:03`.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(45 << 20), "45.0 MiB");
        assert_eq!(bytes(3 << 30), "3.00 GiB");
        assert_eq!(duration(Duration::from_secs(7)), "0:07");
        assert_eq!(duration(Duration::from_secs(750)), "12:30");
        assert_eq!(duration(Duration::from_secs(3723)), "1:02:03");
    }

    #[test]
    fn line_has_percentage_rate_and_time_left() {
        let mut p = Progress::with_output(None, "import app".into(), Some(1000));
        let t0 = p.start;
        p.samples = VecDeque::from([(t0, 0)]);
        p.done = 400;
        let line = p.line(t0 + Duration::from_secs(4));
        assert_eq!(
            line,
            "import app: 400 B of 1000 B (40%), 100 B/s, 0:06 left"
        );
        // Too soon for a rate: bytes and percentage only.
        assert_eq!(
            p.line(t0 + Duration::from_millis(100)),
            "import app: 400 B of 1000 B (40%)"
        );
    }

    #[test]
    fn quiet_counts_but_draws_nothing() {
        let mut p = Progress::new("export app", Some(10), true);
        p.add(4);
        p.add(6);
        p.finish(None);
        assert_eq!(p.done(), 10);
        assert!(!p.open);
    }
}
