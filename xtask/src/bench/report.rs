//! The results of one benchmark run: rows of measurements (plain SQLite and litevfs side by
//! side), the targets of issue 5 with met / not met, failures, and notes; printed as a table and
//! written as JSON (schema `litevfs-bench/1`, described in docs/bench.md).
//!
//! Owns presentation only: it measures nothing and never decides whether the run failed.

use std::fmt::Write as _;

use super::stats::Summary;

/// One metric of one workload.
pub struct Row {
    pub workload: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub plain: Option<Summary>,
    pub litevfs: Option<Summary>,
}

impl Row {
    /// litevfs median / plain median, when both exist.
    pub fn ratio(&self) -> Option<f64> {
        let (p, l) = (self.plain.as_ref()?, self.litevfs.as_ref()?);
        let r = l.median() / p.median();
        r.is_finite().then_some(r)
    }
}

/// A target of this round: `met` is `None` when it could not be measured.
pub struct Target {
    pub name: &'static str,
    pub met: Option<bool>,
    pub detail: String,
}

#[derive(Default)]
pub struct Report {
    pub mode: &'static str,
    pub machine: Vec<(String, String)>,
    pub params: Vec<(String, String)>,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    pub failures: Vec<(String, String)>,
    pub notes: Vec<String>,
    pub duration_s: f64,
}

impl Report {
    pub fn row(
        &mut self,
        workload: &'static str,
        metric: &str,
        unit: &'static str,
        plain: Option<Summary>,
        litevfs: Option<Summary>,
    ) {
        self.rows.push(Row {
            workload,
            metric: metric.to_string(),
            unit,
            plain,
            litevfs,
        });
    }

    pub fn fail(&mut self, workload: &str, why: impl std::fmt::Display) {
        eprintln!("    !! {workload}: {why}");
        self.failures.push((workload.to_string(), why.to_string()));
    }

    pub fn target(&mut self, name: &'static str, met: Option<bool>, detail: String) {
        self.targets.push(Target { name, met, detail });
    }

    /// The first row of `workload` whose metric starts with `metric`.
    pub fn find(&self, workload: &str, metric: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.workload == workload && r.metric.starts_with(metric))
    }

    /// The rows grouped by workload number, in the order measured within a workload.
    fn sorted_rows(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.workload);
        rows
    }

    /// The results table, the targets and the failures, as printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let w = self
            .rows
            .iter()
            .map(|r| r.metric.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            out,
            "{:<15} {:<w$} {:<5} {:>28} {:>28} {:>8}",
            "workload",
            "metric",
            "unit",
            "plain: median [min..max]",
            "litevfs: median [min..max]",
            "lv/plain"
        );
        for r in self.sorted_rows() {
            let ratio = r
                .ratio()
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<15} {:<w$} {:<5} {:>28} {:>28} {:>8}",
                r.workload,
                r.metric,
                r.unit,
                cell(&r.plain),
                cell(&r.litevfs),
                ratio
            );
        }
        let _ = writeln!(out, "\ntargets:");
        for t in &self.targets {
            let _ = writeln!(out, "  [{}] {}: {}", met_word(t.met), t.name, t.detail);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\nFAILED workloads:");
            for (w, e) in &self.failures {
                let _ = writeln!(out, "  - {w}: {e}");
            }
        }
        out
    }

    pub fn json(&self) -> String {
        let mut o = String::from("{\n  \"schema\": \"litevfs-bench/1\",\n");
        let _ = writeln!(o, "  \"mode\": {},", q(self.mode));
        let _ = writeln!(o, "  \"duration_s\": {},", num(self.duration_s));
        let _ = writeln!(o, "  \"machine\": {},", obj(&self.machine));
        let _ = writeln!(o, "  \"params\": {},", obj(&self.params));
        let rows: Vec<String> = self.sorted_rows().into_iter().map(row_json).collect();
        let _ = writeln!(o, "  \"results\": [\n    {}\n  ],", rows.join(",\n    "));
        let targets: Vec<String> = self
            .targets
            .iter()
            .map(|t| {
                let met = t
                    .met
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "null".into());
                format!(
                    "{{\"name\": {}, \"met\": {met}, \"detail\": {}}}",
                    q(t.name),
                    q(&t.detail)
                )
            })
            .collect();
        let _ = writeln!(o, "  \"targets\": [\n    {}\n  ],", targets.join(",\n    "));
        let fails: Vec<String> = self
            .failures
            .iter()
            .map(|(w, e)| format!("{{\"workload\": {}, \"error\": {}}}", q(w), q(e)))
            .collect();
        let _ = writeln!(o, "  \"failures\": [{}],", fails.join(", "));
        let notes: Vec<String> = self.notes.iter().map(|n| q(n)).collect();
        let _ = writeln!(o, "  \"notes\": [{}]\n}}", notes.join(", "));
        o
    }
}

fn met_word(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "MET",
        Some(false) => "NOT MET",
        None => "NOT MEASURED",
    }
}

/// A number with about four significant digits.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn cell(s: &Option<Summary>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.samples.len() == 1 => fmt_num(s.median()),
        Some(s) => format!(
            "{} [{}..{}]",
            fmt_num(s.median()),
            fmt_num(s.min()),
            fmt_num(s.max())
        ),
    }
}

fn row_json(r: &Row) -> String {
    let side = |s: &Option<Summary>| match s {
        None => "null".to_string(),
        Some(s) => {
            let samples: Vec<String> = s.samples.iter().map(|x| num(*x)).collect();
            format!(
                "{{\"median\": {}, \"min\": {}, \"max\": {}, \"n\": {}, \"samples\": [{}]}}",
                num(s.median()),
                num(s.min()),
                num(s.max()),
                s.samples.len(),
                samples.join(", ")
            )
        }
    };
    format!(
        "{{\"workload\": {}, \"metric\": {}, \"unit\": {}, \"plain\": {}, \"litevfs\": {}, \"ratio\": {}}}",
        q(r.workload),
        q(&r.metric),
        q(r.unit),
        side(&r.plain),
        side(&r.litevfs),
        r.ratio().map(num).unwrap_or_else(|| "null".into())
    )
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{}", (x * 1e4).round() / 1e4)
    } else {
        "null".into()
    }
}

fn obj(kv: &[(String, String)]) -> String {
    let parts: Vec<String> = kv
        .iter()
        .map(|(k, v)| format!("{}: {}", q(k), q(v)))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// A JSON string literal.
pub fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_and_ratio() {
        assert_eq!(q("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        let r = Row {
            workload: "w",
            metric: "m".into(),
            unit: "ms",
            plain: Summary::of(vec![2.0]),
            litevfs: Summary::of(vec![3.0]),
        };
        assert_eq!(r.ratio(), Some(1.5));
        let mut rep = Report {
            mode: "quick",
            ..Default::default()
        };
        rep.rows.push(r);
        let j = rep.json();
        assert!(j.contains("\"ratio\": 1.5") && j.contains("\"schema\": \"litevfs-bench/1\""));
    }
}
