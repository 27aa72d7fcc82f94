//! Counters and histograms kept in memory and written in Prometheus' text format (version
//! 0.0.4), each mirrored to an OpenTelemetry instrument once OTLP export is on (`mirror`), so
//! `/metrics` and the OTLP stream carry the same numbers. Gauges are not kept: they are
//! computed when read (`Gauge::render`); one named `_total` is a count read from the database
//! and is typed `counter`.
//!
//! A family has fixed label names; each distinct tuple of label values is a series. Series
//! named in advance (`seed`) show 0 before anything happened, so an idle coordinator still
//! answers every query with a number.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

use opentelemetry::KeyValue;

/// A monotonically increasing count.
pub struct Counter {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, f64>>,
    otel: OnceLock<opentelemetry::metrics::Counter<f64>>,
}

impl Counter {
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Counter {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
            otel: OnceLock::new(),
        }
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1.0);
    }

    pub fn add(&self, values: &[&str], amount: f64) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        *self
            .series
            .lock()
            .expect("metrics lock")
            .entry(owned(values))
            .or_default() += amount;
        if let Some(counter) = self.otel.get() {
            counter.add(amount, &attributes(self.labels, values));
        }
    }

    /// Makes the series exist at 0.
    pub fn seed(&self, values: &[&str]) {
        self.add(values, 0.0);
    }

    /// Drops a series (it shows no more until counted again, from 0).
    pub fn remove(&self, values: &[&str]) {
        self.series
            .lock()
            .expect("metrics lock")
            .remove(&owned(values));
    }

    /// The series' value (0 when it does not exist).
    pub fn value(&self, values: &[&str]) -> f64 {
        self.series
            .lock()
            .expect("metrics lock")
            .get(&owned(values))
            .copied()
            .unwrap_or_default()
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "counter");
        for (values, value) in self.series.lock().expect("metrics lock").iter() {
            sample(out, self.name, self.labels, values, None, *value);
        }
    }

    pub fn mirror(&self, meter: &opentelemetry::metrics::Meter) {
        let counter = meter
            .f64_counter(otel_name(self.name))
            .with_description(self.help)
            .build();
        // Series seeded so far exist in the OTLP stream too.
        for values in self.series.lock().expect("metrics lock").keys() {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            counter.add(0.0, &attributes(self.labels, &values));
        }
        let _ = self.otel.set(counter);
    }
}

/// Observations counted into fixed buckets, with their sum.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    /// Upper bounds, ascending; `+Inf` is implied.
    bounds: &'static [f64],
    series: Mutex<BTreeMap<Vec<String>, Buckets>>,
    otel: OnceLock<opentelemetry::metrics::Histogram<f64>>,
}

#[derive(Clone)]
struct Buckets {
    /// Per bucket, not cumulative; the last is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Self {
        Histogram {
            name,
            help,
            labels,
            bounds,
            series: Mutex::new(BTreeMap::new()),
            otel: OnceLock::new(),
        }
    }

    pub fn observe(&self, values: &[&str], value: f64) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        let mut series = self.series.lock().expect("metrics lock");
        let buckets = series.entry(owned(values)).or_insert_with(|| Buckets {
            counts: vec![0; self.bounds.len() + 1],
            sum: 0.0,
        });
        buckets.counts[bucket] += 1;
        buckets.sum += value;
        drop(series);
        if let Some(histogram) = self.otel.get() {
            histogram.record(value, &attributes(self.labels, values));
        }
    }

    /// Makes the series exist with no observations.
    pub fn seed(&self, values: &[&str]) {
        self.series
            .lock()
            .expect("metrics lock")
            .entry(owned(values))
            .or_insert_with(|| Buckets {
                counts: vec![0; self.bounds.len() + 1],
                sum: 0.0,
            });
    }

    /// How many observations the series has, and their sum.
    pub fn count_and_sum(&self, values: &[&str]) -> (u64, f64) {
        self.series
            .lock()
            .expect("metrics lock")
            .get(&owned(values))
            .map_or((0, 0.0), |buckets| {
                (buckets.counts.iter().sum(), buckets.sum)
            })
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "histogram");
        let bucket_name = format!("{}_bucket", self.name);
        for (values, buckets) in self.series.lock().expect("metrics lock").iter() {
            let mut cumulative = 0;
            for (index, count) in buckets.counts.iter().enumerate() {
                cumulative += count;
                let bound = self
                    .bounds
                    .get(index)
                    .map_or_else(|| "+Inf".to_owned(), |bound| bound.to_string());
                sample(
                    out,
                    &bucket_name,
                    self.labels,
                    values,
                    Some(&bound),
                    cumulative as f64,
                );
            }
            sample(
                out,
                &format!("{}_sum", self.name),
                self.labels,
                values,
                None,
                buckets.sum,
            );
            sample(
                out,
                &format!("{}_count", self.name),
                self.labels,
                values,
                None,
                cumulative as f64,
            );
        }
    }

    pub fn mirror(&self, meter: &opentelemetry::metrics::Meter) {
        let histogram = meter
            .f64_histogram(otel_name(self.name))
            .with_description(self.help)
            .with_boundaries(self.bounds.to_vec())
            .build();
        let _ = self.otel.set(histogram);
    }
}

/// A gauge's values: each series' label values with its value.
pub type Samples = Vec<(Vec<String>, f64)>;

/// A value computed when read: `render` takes the samples.
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

impl Gauge {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Gauge { name, help, labels }
    }

    /// A `_total` family is a count that only grows (runs finished, from the database): a
    /// counter to Prometheus and OpenTelemetry, though computed when read.
    pub fn is_counter(&self) -> bool {
        self.name.ends_with("_total")
    }

    pub fn render(&self, out: &mut String, samples: &Samples) {
        let kind = if self.is_counter() {
            "counter"
        } else {
            "gauge"
        };
        header(out, self.name, self.help, kind);
        for (values, value) in samples {
            sample(out, self.name, self.labels, values, None, *value);
        }
    }
}

/// The OpenTelemetry name of a Prometheus-named metric: dots for the namespace, no `_total`
/// (OpenTelemetry's Prometheus conventions add it back for counters).
pub fn otel_name(prometheus_name: &'static str) -> String {
    let name = prometheus_name
        .strip_suffix("_total")
        .unwrap_or(prometheus_name);
    match name.split_once('_') {
        Some((namespace, rest)) => format!("{namespace}.{rest}"),
        None => name.to_owned(),
    }
}

pub fn attributes(labels: &[&'static str], values: &[&str]) -> Vec<KeyValue> {
    labels
        .iter()
        .zip(values)
        .map(|(label, value)| KeyValue::new(*label, (*value).to_owned()))
        .collect()
}

fn owned(values: &[&str]) -> Vec<String> {
    values.iter().map(|value| (*value).to_owned()).collect()
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(
        out,
        "# HELP {name} {}",
        help.replace('\\', r"\\").replace('\n', r"\n")
    );
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(
    out: &mut String,
    name: &str,
    labels: &[&str],
    values: &[String],
    le: Option<&str>,
    value: f64,
) {
    out.push_str(name);
    let mut pairs: Vec<(&str, &str)> = labels
        .iter()
        .copied()
        .zip(values.iter().map(String::as_str))
        .collect();
    if let Some(le) = le {
        pairs.push(("le", le));
    }
    if !pairs.is_empty() {
        out.push('{');
        for (index, (label, value)) in pairs.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            let escaped = value
                .replace('\\', r"\\")
                .replace('"', "\\\"")
                .replace('\n', r"\n");
            let _ = write!(out, "{label}=\"{escaped}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(value));
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_seeded_series_and_escape_labels() {
        let counter = Counter::new("slimci_things_total", "Things.", &["kind"]);
        counter.seed(&["a"]);
        counter.inc(&["we\"ird\\"]);
        counter.add(&["we\"ird\\"], 2.0);
        let mut out = String::new();
        counter.render(&mut out);
        assert_eq!(
            out,
            "# HELP slimci_things_total Things.\n# TYPE slimci_things_total counter\n\
             slimci_things_total{kind=\"a\"} 0\n\
             slimci_things_total{kind=\"we\\\"ird\\\\\"} 3\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let histogram = Histogram::new("slimci_wait_seconds", "Wait.", &[], &[1.0, 10.0]);
        for value in [0.5, 2.0, 3.0, 60.0] {
            histogram.observe(&[], value);
        }
        let mut out = String::new();
        histogram.render(&mut out);
        assert!(
            out.contains("slimci_wait_seconds_bucket{le=\"1\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("slimci_wait_seconds_bucket{le=\"10\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("slimci_wait_seconds_bucket{le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("slimci_wait_seconds_sum 65.5\n"), "{out}");
        assert!(out.contains("slimci_wait_seconds_count 4\n"), "{out}");
        assert_eq!(histogram.count_and_sum(&[]), (4, 65.5));
    }

    #[test]
    fn values_read_when_scraped_are_gauges_unless_they_are_totals() {
        let samples: Samples = vec![(vec!["ci".to_owned()], 3.0)];
        let mut out = String::new();
        Gauge::new("slimci_runs_finished_total", "Runs.", &["kind"]).render(&mut out, &samples);
        Gauge::new("slimci_runs_running", "Running.", &["kind"]).render(&mut out, &samples);
        assert_eq!(
            out,
            "# HELP slimci_runs_finished_total Runs.\n# TYPE slimci_runs_finished_total counter\n\
             slimci_runs_finished_total{kind=\"ci\"} 3\n\
             # HELP slimci_runs_running Running.\n# TYPE slimci_runs_running gauge\n\
             slimci_runs_running{kind=\"ci\"} 3\n"
        );
    }

    #[test]
    fn otel_names_use_dots_and_drop_total() {
        assert_eq!(
            otel_name("slimci_runs_finished_total"),
            "slimci.runs_finished"
        );
        assert_eq!(
            otel_name("slimci_queue_wait_seconds"),
            "slimci.queue_wait_seconds"
        );
    }
}
