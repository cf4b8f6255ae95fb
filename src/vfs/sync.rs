//! The change poller: one background thread asking the store what changed in every open database.
//!
//! Owns the polling loop: one `POST /sync` for all open databases whose sync period is not
//! zero, as a long-poll (`wait`) when the store supports it so a change arrives in
//! milliseconds, otherwise once per period. It hands each change set to its database
//! ([`Database::offer`]), which applies it only between transactions. It never touches pages.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::client::Client;
use super::database::Database;

/// How long one long-poll request may wait for a change.
pub const LONG_POLL_WAIT: Duration = Duration::from_secs(5);
/// Least time between two polls.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Set when a database opens, so an idle poller starts watching it at once.
static OPENED: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Tells the poller that a database opened (it may be idle, waiting for one).
pub fn database_opened() {
    let (flag, cv) = &OPENED;
    *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
    cv.notify_all();
}

/// Waits until a database opens, at most `timeout`.
fn wait_for_open(timeout: Duration) {
    let (flag, cv) = &OPENED;
    let guard = flag.lock().unwrap_or_else(|p| p.into_inner());
    let (mut opened, _) = cv
        .wait_timeout_while(guard, timeout, |opened| !*opened)
        .unwrap_or_else(|p| p.into_inner());
    *opened = false;
}

/// Runs forever.
pub fn poller(client: Arc<Client>, databases: impl Fn() -> Vec<Arc<Database>>) {
    let mut long_poll = true;
    let mut last_warning: Option<Instant> = None;
    loop {
        let dbs: Vec<Arc<Database>> = databases()
            .into_iter()
            .filter(|d| {
                d.handles.load(std::sync::atomic::Ordering::Relaxed) > 0
                    && !d.sync_period().is_zero()
            })
            .collect();
        let Some(period) = dbs.iter().map(|d| d.sync_period()).min() else {
            wait_for_open(Duration::from_millis(100));
            continue;
        };
        let positions: BTreeMap<String, _> = dbs
            .iter()
            .map(|d| (d.name.clone(), d.state.lock().store_pos()))
            .collect();
        for d in &dbs {
            d.state.lock().watched = long_poll;
        }
        let wait = long_poll.then_some(LONG_POLL_WAIT);
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            client.sync(positions.clone(), wait, super::client::REQUEST_TIMEOUT)
        }));
        for d in &dbs {
            d.state.lock().watched = false;
            d.stats
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match result {
            Ok(Ok(mut changes)) => {
                let moved = dbs.iter().any(|d| {
                    let sent = positions[&d.name];
                    match changes.get(&d.name) {
                        Some(c) => c.pos != sent || c.drops_all(),
                        None => !sent.is_zero(),
                    }
                });
                for d in &dbs {
                    d.offer(positions[&d.name], changes.remove(&d.name));
                }
                if long_poll && !moved && started.elapsed() < LONG_POLL_WAIT / 2 {
                    tracing::debug!(
                        "the page store does not hold sync requests (no long-poll); polling every period"
                    );
                    long_poll = false;
                }
                if !long_poll {
                    std::thread::sleep(period);
                } else if started.elapsed() < MIN_POLL_INTERVAL {
                    // A store that answers at once every time must not make this loop spin.
                    std::thread::sleep(MIN_POLL_INTERVAL);
                }
            }
            Ok(Err(e)) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!("change poller: {e}");
                    last_warning = Some(Instant::now());
                }
                std::thread::sleep(period.max(Duration::from_millis(500)));
            }
            Err(_) => std::thread::sleep(period.max(Duration::from_secs(1))),
        }
    }
}
