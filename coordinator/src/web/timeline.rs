//! The picture of a build: one bar per node on the dbt thread that ran it, from dbt's
//! `run_results.json` (`thread_id`, and when each node ran, read by `slimci_proto::run_results`,
//! the reader the agent's node results share), drawn as SVG on the server. Pure: bytes in, text
//! out.
//!
//! Bars are grouped by status into one `<path>` each (a stroke per bar, moving relative to the
//! bar before it on its thread), so a build of 2,000 nodes stays under 20 KB; a small build
//! gets one `<rect>` per node with its name as a tooltip.
//! Colours are attributes, not classes, so the picture is the same inline in the run's page and
//! on its own (`/runs/{id}/timeline.svg`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use chrono::{DateTime, Utc};
use slimci_proto::run_results::RunResults;

/// Builds with at most this many nodes get a tooltip per bar.
const TOOLTIPS_UP_TO: usize = 400;
/// The drawing's width in SVG units; it scales to the page.
const WIDTH: f64 = 1000.0;
/// Room for the thread names on the left.
const LABELS: f64 = 90.0;
const LANE: f64 = 18.0;
const BAR: f64 = 12.0;
const AXIS: f64 = 22.0;

/// One node as the timeline draws it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub unique_id: String,
    pub status: String,
    pub thread: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// What `run_results.json` says of when and where each node ran.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Timeline {
    pub bars: Vec<Bar>,
    /// The critical path, as indices into `bars` in time order: the node that ended last, the
    /// dependency built in this run that ended last before it, and so on back.
    pub critical: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("run_results.json cannot be read: {0}")]
pub struct TimelineError(#[from] serde_json::Error);

impl Timeline {
    /// The nodes of `run_results.json` that say when they ran; nodes without timing (skipped
    /// ones) are left out.
    pub fn from_run_results(bytes: &[u8]) -> Result<Timeline, TimelineError> {
        let results = RunResults::parse(bytes)?;
        let mut bars = Vec::with_capacity(results.results.len());
        for entry in results.results {
            let (Some(start), Some(end)) = (entry.started_at(), entry.completed_at()) else {
                continue;
            };
            bars.push(Bar {
                unique_id: entry.unique_id,
                status: entry.status,
                thread: entry.thread_id.unwrap_or_else(|| "main".to_owned()),
                start,
                end: end.max(start),
            });
        }
        bars.sort_by_key(|bar| bar.start);
        Ok(Timeline {
            bars,
            critical: Vec::new(),
        })
    }

    /// Marks the critical path through the build, given each node's parents (a manifest's
    /// `depends_on.nodes`): from the node that ended last, back through the parent built in
    /// this run that ended last, while there is one. That chain is what kept the build from
    /// ending sooner.
    pub fn with_critical_path(mut self, parents: &HashMap<String, Vec<String>>) -> Timeline {
        let index: HashMap<&str, usize> = self
            .bars
            .iter()
            .enumerate()
            .map(|(at, bar)| (bar.unique_id.as_str(), at))
            .collect();
        let Some(mut current) = (0..self.bars.len()).max_by_key(|at| self.bars[*at].end) else {
            return self;
        };
        let mut path = vec![current];
        // A manifest that loops (it is the build's own output) ends the walk, in linear time.
        let mut on_path = HashSet::from([current]);
        while let Some(parent) = parents
            .get(&self.bars[current].unique_id)
            .into_iter()
            .flatten()
            .filter_map(|parent| index.get(parent.as_str()).copied())
            .filter(|parent| !on_path.contains(parent))
            .max_by_key(|parent| self.bars[*parent].end)
        {
            on_path.insert(parent);
            path.push(parent);
            current = parent;
        }
        path.reverse();
        self.critical = path;
        self
    }

    /// The critical path's length: from its first node's start to its last node's end.
    pub fn critical_s(&self) -> f64 {
        match (self.critical.first(), self.critical.last()) {
            (Some(first), Some(last)) => {
                (self.bars[*last].end - self.bars[*first].start)
                    .num_milliseconds()
                    .max(0) as f64
                    / 1000.0
            }
            _ => 0.0,
        }
    }

    /// The threads in their natural order (`Thread-2` before `Thread-10`).
    fn threads(&self) -> Vec<&str> {
        let mut threads: Vec<&str> = self.bars.iter().map(|bar| bar.thread.as_str()).collect();
        threads.sort_by_key(|name| {
            let digits: String = name.chars().filter(char::is_ascii_digit).collect();
            (digits.parse::<u64>().unwrap_or(u64::MAX), name.to_string())
        });
        threads.dedup();
        threads
    }

    /// Seconds from the first node's start to the last node's end.
    pub fn span_s(&self) -> f64 {
        let (Some(first), Some(last)) = (
            self.bars.iter().map(|bar| bar.start).min(),
            self.bars.iter().map(|bar| bar.end).max(),
        ) else {
            return 0.0;
        };
        (last - first).num_milliseconds().max(0) as f64 / 1000.0
    }

    /// The SVG: a lane per thread, a bar per node coloured by its status class, and a time
    /// axis. Node names are escaped.
    pub fn svg(&self) -> String {
        let threads = self.threads();
        let Some(first) = self.bars.iter().map(|bar| bar.start).min() else {
            return String::new();
        };
        let span = self.span_s().max(0.001);
        let scale = (WIDTH - LABELS - 10.0) / span;
        let height = threads.len() as f64 * LANE + AXIS;
        let lane_of: BTreeMap<&str, usize> = threads
            .iter()
            .enumerate()
            .map(|(index, name)| (*name, index))
            .collect();
        let mut svg = String::with_capacity(64 * self.bars.len() + 1024);
        let _ = write!(
            svg,
            r##"<svg class="timeline" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="build timeline: {} nodes on {} threads over {span:.1} s" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11"><rect width="{WIDTH}" height="{height}" fill="#fff"/><g fill="{TEXT}">"##,
            self.bars.len(),
            threads.len()
        );
        for (index, name) in threads.iter().enumerate() {
            let y = index as f64 * LANE + BAR;
            let _ = write!(svg, r#"<text x="0" y="{y}">{}</text>"#, escape(name));
        }
        svg.push_str("</g>");
        let x_of = |at: DateTime<Utc>| {
            LABELS + (at - first).num_milliseconds().max(0) as f64 / 1000.0 * scale
        };
        // Width at least a hair, so a node of a millisecond is still seen.
        let width_of =
            |bar: &Bar| ((bar.end - bar.start).num_milliseconds() as f64 / 1000.0 * scale).max(0.8);
        if self.bars.len() <= TOOLTIPS_UP_TO {
            for bar in &self.bars {
                let y = lane_of[bar.thread.as_str()] as f64 * LANE + 2.0;
                let _ = write!(
                    svg,
                    r#"<rect x="{:.1}" y="{y}" width="{:.1}" height="{BAR}" fill="{}"><title>{} {} {:.2} s</title></rect>"#,
                    x_of(bar.start),
                    width_of(bar),
                    colour(status_class(&bar.status)),
                    escape(&bar.unique_id),
                    escape(&bar.status),
                    (bar.end - bar.start).num_milliseconds() as f64 / 1000.0
                );
            }
        } else {
            // One path per status, each bar a horizontal stroke as thick as a bar, in tenths
            // of a unit (whole numbers are shorter than decimals); a lane's bars in time order,
            // each moving on from where the one before it ended (`m<gap> 0h<width>`).
            let mut lanes: BTreeMap<(&str, usize), Vec<&Bar>> = BTreeMap::new();
            for bar in &self.bars {
                lanes
                    .entry((status_class(&bar.status), lane_of[bar.thread.as_str()]))
                    .or_default()
                    .push(bar);
            }
            let mut paths: BTreeMap<&str, String> = BTreeMap::new();
            for ((class, lane), bars) in lanes {
                let path = paths.entry(class).or_default();
                let y = ((lane as f64 * LANE + 2.0 + BAR / 2.0) * 10.0).round() as i64;
                let mut end: Option<i64> = None;
                for bar in bars {
                    let x = (x_of(bar.start) * 10.0).round() as i64;
                    let width = (width_of(bar) * 10.0).round() as i64;
                    let _ = match end {
                        None => write!(path, "M{x} {y}h{width}"),
                        Some(end) => write!(path, "m{} 0h{width}", x - end),
                    };
                    end = Some(x + width);
                }
            }
            for (class, path) in paths {
                let _ = write!(
                    svg,
                    r#"<path fill="none" stroke="{}" stroke-width="{}" transform="scale(.1)" d="{path}"/>"#,
                    colour(class),
                    BAR * 10.0
                );
            }
        }
        // The critical path: each of its bars outlined, one path for all.
        if !self.critical.is_empty() {
            let mut path = String::with_capacity(32 * self.critical.len());
            for at in &self.critical {
                let bar = &self.bars[*at];
                let y = lane_of[bar.thread.as_str()] as f64 * LANE + 1.0;
                let _ = write!(
                    path,
                    "M{:.1} {y}h{:.1}v{}h{:.1}z",
                    x_of(bar.start),
                    width_of(bar),
                    BAR + 2.0,
                    -width_of(bar)
                );
            }
            let _ = write!(
                svg,
                r#"<path class="critical" fill="none" stroke="{CRITICAL}" stroke-width="1.6" d="{path}"><title>critical path: {} nodes</title></path>"#,
                self.critical.len()
            );
        }
        // A tick every round step, about eight of them.
        let step = nice_step(span / 8.0);
        let axis_y = threads.len() as f64 * LANE + 14.0;
        let _ = write!(svg, r#"<g fill="{TEXT}">"#);
        let mut tick = 0.0;
        while tick <= span + 1e-9 {
            let x = LABELS + tick * scale;
            let _ = write!(
                svg,
                r#"<text x="{x:.1}" y="{axis_y}">{}</text>"#,
                seconds_label(tick)
            );
            tick += step;
        }
        svg.push_str("</g></svg>");
        svg
    }
}

/// The colour of the text.
const TEXT: &str = "#5f6b7a";
/// The outline of the critical path's bars.
const CRITICAL: &str = "#1d2330";

/// Each node's parents, from a manifest's `nodes.*.depends_on.nodes` (everything else in it is
/// skipped unread).
pub fn parents_from_manifest(bytes: &[u8]) -> Result<HashMap<String, Vec<String>>, TimelineError> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        nodes: HashMap<String, Node>,
    }
    #[derive(serde::Deserialize)]
    struct Node {
        #[serde(default)]
        depends_on: DependsOn,
    }
    #[derive(serde::Deserialize, Default)]
    struct DependsOn {
        #[serde(default)]
        nodes: Vec<String>,
    }
    let manifest: Manifest = serde_json::from_slice(bytes)?;
    Ok(manifest
        .nodes
        .into_iter()
        .map(|(id, node)| (id, node.depends_on.nodes))
        .collect())
}

/// The colour of a status class's bars (the page's stylesheet uses the same).
fn colour(class: &str) -> &'static str {
    match class {
        "ok" => "#2f9e44",
        "warn" => "#f08c00",
        "bad" => "#d6336c",
        _ => "#868e96",
    }
}

/// A node status's class: `ok`, `warn`, `bad` or `other`.
pub fn status_class(status: &str) -> &'static str {
    match status {
        "success" | "pass" => "ok",
        "warn" => "warn",
        "error" | "fail" | "runtime error" => "bad",
        _ => "other",
    }
}

fn nice_step(rough: f64) -> f64 {
    for step in [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ] {
        if step >= rough {
            return step;
        }
    }
    (rough / 600.0).ceil() * 600.0
}

fn seconds_label(seconds: f64) -> String {
    if seconds >= 60.0 {
        format!(
            "{}m{:02}s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else if seconds.fract().abs() > 1e-9 {
        format!("{seconds:.1}s")
    } else {
        format!("{seconds:.0}s")
    }
}

/// Text made safe for XML content and attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Characters XML 1.0 does not allow (controls other than tab and line ends, U+FFFE,
            // U+FFFF): one would make `timeline.svg` fail to parse as an image.
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_is_valid_in_xml() {
        assert_eq!(
            escape("a<b>&\"c'\u{1}\u{FFFF}\td"),
            "a&lt;b&gt;&amp;&quot;c&#39;\u{FFFD}\u{FFFD}\td"
        );
    }

    fn results(entries: &[(&str, &str, &str, &str, &str)]) -> Vec<u8> {
        let results: Vec<serde_json::Value> = entries
            .iter()
            .map(|(id, status, thread, start, end)| {
                serde_json::json!({
                    "unique_id": id, "status": status, "thread_id": thread,
                    "timing": [
                        {"name": "compile", "started_at": start, "completed_at": start},
                        {"name": "execute", "started_at": start, "completed_at": end},
                    ],
                })
            })
            .collect();
        serde_json::json!({ "results": results })
            .to_string()
            .into_bytes()
    }

    #[test]
    fn nodes_land_on_their_threads_in_time_order() {
        let bytes = results(&[
            (
                "model.s.b",
                "success",
                "Thread-2",
                "2024-05-01T10:00:01Z",
                "2024-05-01T10:00:03Z",
            ),
            (
                "model.s.a",
                "success",
                "Thread-1",
                "2024-05-01T10:00:00Z",
                "2024-05-01T10:00:01Z",
            ),
            (
                "test.s.<x>",
                "fail",
                "Thread-10",
                "2024-05-01T10:00:03.5",
                "2024-05-01T10:00:04",
            ),
        ]);
        let timeline = Timeline::from_run_results(&bytes).unwrap();
        assert_eq!(
            timeline
                .bars
                .iter()
                .map(|b| b.unique_id.as_str())
                .collect::<Vec<_>>(),
            ["model.s.a", "model.s.b", "test.s.<x>"]
        );
        assert_eq!(timeline.threads(), ["Thread-1", "Thread-2", "Thread-10"]);
        assert!((timeline.span_s() - 4.0).abs() < 1e-9);
        let svg = timeline.svg();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 3);
        assert!(
            svg.contains(r##"fill="#d6336c"><title>test.s.&lt;x&gt; fail"##),
            "{svg}"
        );
        assert!(!svg.contains("<x>"));
    }

    #[test]
    fn the_critical_path_is_the_chain_of_last_finished_parents() {
        // a (0-1 s) feeds b (1-3 s) and c (1-2 s); d (3-5 s) needs b and c; e (0-4 s) stands
        // alone. The build ends with d, which waited for b, which waited for a.
        let bytes = results(&[
            (
                "model.s.a",
                "success",
                "Thread-1",
                "2024-05-01T10:00:00Z",
                "2024-05-01T10:00:01Z",
            ),
            (
                "model.s.b",
                "success",
                "Thread-1",
                "2024-05-01T10:00:01Z",
                "2024-05-01T10:00:03Z",
            ),
            (
                "model.s.c",
                "success",
                "Thread-2",
                "2024-05-01T10:00:01Z",
                "2024-05-01T10:00:02Z",
            ),
            (
                "model.s.d",
                "success",
                "Thread-2",
                "2024-05-01T10:00:03Z",
                "2024-05-01T10:00:05Z",
            ),
            (
                "model.s.e",
                "success",
                "Thread-3",
                "2024-05-01T10:00:00Z",
                "2024-05-01T10:00:04Z",
            ),
        ]);
        let manifest = serde_json::json!({
            "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"},
            "nodes": {
                "model.s.a": {"depends_on": {"nodes": ["source.s.raw.orders"]}, "name": "a"},
                "model.s.b": {"depends_on": {"nodes": ["model.s.a"]}},
                "model.s.c": {"depends_on": {"nodes": ["model.s.a"]}},
                "model.s.d": {"depends_on": {"nodes": ["model.s.b", "model.s.c", "model.s.deferred"]}},
                "model.s.e": {"depends_on": {"macros": ["macro.x"]}},
            },
        });
        let parents = parents_from_manifest(manifest.to_string().as_bytes()).unwrap();
        let timeline = Timeline::from_run_results(&bytes)
            .unwrap()
            .with_critical_path(&parents);
        let critical: Vec<&str> = timeline
            .critical
            .iter()
            .map(|at| timeline.bars[*at].unique_id.as_str())
            .collect();
        assert_eq!(critical, ["model.s.a", "model.s.b", "model.s.d"]);
        assert!((timeline.critical_s() - 5.0).abs() < 1e-9);
        let svg = timeline.svg();
        assert_eq!(svg.matches(r#"<path class="critical""#).count(), 1, "{svg}");
        let outline = svg
            .split(r#"<path class="critical""#)
            .nth(1)
            .and_then(|rest| rest.split(r#"d=""#).nth(1))
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        assert_eq!(
            outline.matches('z').count(),
            3,
            "one outline per critical bar: {outline}"
        );
        // Without a manifest there is no path to mark.
        let plain = Timeline::from_run_results(&bytes).unwrap();
        assert!(plain.critical.is_empty() && !plain.svg().contains("critical"));
    }

    #[test]
    fn a_large_build_is_drawn_as_one_path_per_status() {
        let entries: Vec<(String, &str, String, String, String)> = (0..2000)
            .map(|i| {
                let start = format!("2024-05-01T10:{:02}:{:02}Z", i / 600, (i / 10) % 60);
                (
                    format!("model.s.m{i}"),
                    if i % 100 == 0 { "error" } else { "success" },
                    format!("Thread-{}", i % 4 + 1),
                    start.clone(),
                    start,
                )
            })
            .collect();
        let borrowed: Vec<(&str, &str, &str, &str, &str)> = entries
            .iter()
            .map(|(a, b, c, d, e)| (a.as_str(), *b, c.as_str(), d.as_str(), e.as_str()))
            .collect();
        let svg = Timeline::from_run_results(&results(&borrowed))
            .unwrap()
            .svg();
        assert_eq!(svg.matches("<path").count(), 2);
        assert!(svg.len() < 30_000, "{} bytes", svg.len());
    }

    #[test]
    fn results_without_timing_draw_nothing() {
        let timeline = Timeline::from_run_results(
            br#"{"results":[{"unique_id":"m","status":"skipped","timing":[]}]}"#,
        )
        .unwrap();
        assert!(timeline.bars.is_empty());
        assert_eq!(timeline.svg(), "");
        assert!(Timeline::from_run_results(b"nope").is_err());
    }
}
