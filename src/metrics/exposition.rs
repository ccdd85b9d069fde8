//! The Prometheus text exposition format, version 0.0.4: `# HELP` and
//! `# TYPE` once per family, then one line per sample.
//!
//! <https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format>

use std::fmt::Write;

use super::latency::{Latency, BUCKETS};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds one exposition document.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn finish(self) -> String {
        self.out
    }

    /// Starts a family. Every sample of it must follow before the next.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// The samples of one histogram series: cumulative buckets, `+Inf`,
    /// sum and count.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], latency: &Latency) {
        let bucket = format!("{name}_bucket");
        for le in BUCKETS {
            let count = latency.count_at_or_below(le);
            self.out.push_str(&bucket);
            write_labels(&mut self.out, labels, Some(&number(le)));
            let _ = writeln!(self.out, " {count}");
        }
        self.out.push_str(&bucket);
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", latency.count());
        self.sample(&format!("{name}_sum"), labels, latency.sum_seconds());
        self.sample(&format!("{name}_count"), labels, latency.count() as f64);
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
    for (k, v) in all {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape_label_value(out, v);
        out.push('"');
    }
    out.push('}');
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escapes backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Integers without a fraction, so counters read as counts.
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values_and_writes_histograms() {
        let mut e = Exposition::new();
        e.family("t_total", "counter", "A test.\nSecond line.");
        e.sample("t_total", &[("token_id", "a\"b\\c\nd")], 3.0);
        let mut l = Latency::new();
        l.record(std::time::Duration::from_micros(30));
        e.family("t_seconds", "histogram", "Latency.");
        e.histogram("t_seconds", &[("shard", "0")], &l);
        let text = e.finish();
        assert!(text.contains("# HELP t_total A test.\\nSecond line.\n"));
        assert!(text.contains("t_total{token_id=\"a\\\"b\\\\c\\nd\"} 3\n"));
        assert!(text.contains("t_seconds_bucket{shard=\"0\",le=\"0.00001\"} 0\n"));
        assert!(text.contains("t_seconds_bucket{shard=\"0\",le=\"0.00005\"} 1\n"));
        assert!(text.contains("t_seconds_bucket{shard=\"0\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("t_seconds_sum{shard=\"0\"} 0.00003\n"));
        assert!(text.contains("t_seconds_count{shard=\"0\"} 1\n"));
    }
}
