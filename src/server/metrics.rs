//! Prometheus metrics of the server, rendered as text by `GET /metrics`.
//!
//! Owns the counters and gauges and their names (documented in `docs/server.md`). Counters only
//! go up; the whole set lives in memory and starts at zero on every start.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// All metrics. Cheap to update from any thread.
#[derive(Default)]
pub struct Metrics {
    /// (route, method, status) -> count. The labels are the fixed sets of `routes.rs`, so
    /// counting a request allocates nothing.
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    /// lease event -> count.
    leases: Mutex<BTreeMap<&'static str, u64>>,
    pub pages_served: AtomicU64,
    pub page_bytes_served: AtomicU64,
    pub snapshot_bytes_served: AtomicU64,
    pub commits: AtomicU64,
    pub commit_pages: AtomicU64,
    pub uploads: AtomicU64,
    pub restores: AtomicU64,
    pub compactions: AtomicU64,
    pub compacted_page_versions: AtomicU64,
    pub page_versions: AtomicU64,
    pub bucket_segments: AtomicU64,
    pub bucket_images: AtomicU64,
    pub bucket_deleted: AtomicU64,
    /// (cluster, database, bytes stored), as of the last compaction pass.
    database_bytes: Mutex<Vec<(String, String, u64)>>,
}

const COUNTERS: &[(&str, &str)] = &[
    (
        "litevfs_pages_served_total",
        "Pages returned by GET /db/page.",
    ),
    (
        "litevfs_page_bytes_served_total",
        "Page data bytes returned by GET /db/page.",
    ),
    (
        "litevfs_snapshot_bytes_served_total",
        "Bytes streamed by GET /db/snapshot.",
    ),
    (
        "litevfs_commits_total",
        "Transactions accepted by POST /db/tx.",
    ),
    (
        "litevfs_commit_pages_total",
        "Page versions stored by POST /db/tx.",
    ),
    (
        "litevfs_uploads_total",
        "Databases imported by POST /db/upload.",
    ),
    (
        "litevfs_restores_total",
        "Restores done by POST /db/restore.",
    ),
    ("litevfs_compactions_total", "Compaction passes run."),
    (
        "litevfs_compacted_page_versions_total",
        "Page versions deleted by compaction.",
    ),
    (
        "litevfs_bucket_segments_written_total",
        "Segments written by compaction in the object store.",
    ),
    (
        "litevfs_bucket_images_written_total",
        "Images (new bases) written by compaction in the object store.",
    ),
    (
        "litevfs_bucket_objects_deleted_total",
        "Objects deleted from the object store by retention and garbage collection.",
    ),
];

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn request(&self, route: &'static str, method: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, method, status)).or_default() += 1;
    }

    pub fn lease_event(&self, event: &'static str) {
        *self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(event)
            .or_default() += 1;
    }

    /// Replaces the per-database sizes with those of the latest compaction pass.
    pub fn set_database_bytes(&self, sizes: Vec<(String, String, u64)>) {
        *self
            .database_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = sizes;
    }

    fn counter_values(&self) -> [u64; 12] {
        [
            &self.pages_served,
            &self.page_bytes_served,
            &self.snapshot_bytes_served,
            &self.commits,
            &self.commit_pages,
            &self.uploads,
            &self.restores,
            &self.compactions,
            &self.compacted_page_versions,
            &self.bucket_segments,
            &self.bucket_images,
            &self.bucket_deleted,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP litevfs_http_requests_total HTTP requests by route, method and status.\n",
        );
        out.push_str("# TYPE litevfs_http_requests_total counter\n");
        for ((route, method, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "litevfs_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP litevfs_lease_events_total Lease operations by outcome.\n");
        out.push_str("# TYPE litevfs_lease_events_total counter\n");
        for (event, n) in self.leases.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "litevfs_lease_events_total{{event=\"{event}\"}} {n}");
        }
        for ((name, help), v) in COUNTERS.iter().zip(self.counter_values()) {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let versions = self.page_versions.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP litevfs_page_versions Page versions in the store after the last compaction.\n\
             # TYPE litevfs_page_versions gauge\nlitevfs_page_versions {versions}"
        );
        out.push_str(
            "# HELP litevfs_database_bytes Bytes of page versions stored per database (live \
             pages and retained history), after the last compaction pass.\n\
             # TYPE litevfs_database_bytes gauge\n",
        );
        let sizes = self
            .database_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (cluster, db, bytes) in sizes.iter() {
            let _ = writeln!(
                out,
                "litevfs_database_bytes{{cluster=\"{}\",db=\"{}\"}} {bytes}",
                escape(cluster),
                escape(db)
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labels() {
        let m = Metrics::default();
        m.request("/db/page", "GET", 200);
        m.request("/db/page", "GET", 200);
        m.lease_event("acquire");
        Metrics::add(&m.commits, 3);
        m.set_database_bytes(vec![("default".into(), "a\"b".into(), 8192)]);
        let text = m.render();
        assert!(text.contains("litevfs_database_bytes{cluster=\"default\",db=\"a\\\"b\"} 8192\n"));
        assert!(text.contains(
            "litevfs_http_requests_total{route=\"/db/page\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains("litevfs_lease_events_total{event=\"acquire\"} 1"));
        assert!(text.contains("\nlitevfs_commits_total 3\n"));
    }
}
