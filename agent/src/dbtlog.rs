//! Reads dbt's `--log-format json` output: each line becomes a line for people, and node
//! results advance the progress counter. Lines that are not dbt JSON (a Python traceback, a
//! print from a Python model) pass through unchanged.

use serde::Deserialize;

#[derive(Deserialize)]
struct Line {
    info: Info,
    #[serde(default)]
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct Info {
    #[serde(default)]
    name: String,
    #[serde(default)]
    level: String,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    ts: String,
}

/// Tracks progress over the lines of one invocation.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: u32,
    pub total: u32,
    /// When dbt announced itself (`Running with dbt=...`): Python and dbt are loaded.
    pub started: Option<std::time::Instant>,
    /// When dbt reported what it found (`Found N models, ...`): the project is parsed.
    pub parsed: Option<std::time::Instant>,
}

/// What one output line means.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The line to show, or none for dbt's debug-level events.
    pub text: Option<String>,
    pub progress_changed: bool,
}

impl Progress {
    pub fn read(&mut self, raw: &str) -> Parsed {
        let Ok(line) = serde_json::from_str::<Line>(raw) else {
            return Parsed {
                text: Some(raw.to_owned()),
                progress_changed: false,
            };
        };
        let mut changed = false;
        // Model, seed and snapshot results carry `total`; test results carry `num_models`.
        let total = ["total", "num_models"]
            .iter()
            .find_map(|key| line.data.get(key).and_then(serde_json::Value::as_u64));
        let name = line.info.name.as_str();
        match name {
            "ConcurrencyLine" => {
                if let Some(count) = line
                    .data
                    .get("node_count")
                    .and_then(serde_json::Value::as_u64)
                {
                    self.total = count as u32;
                    changed = true;
                }
            }
            "LogStartLine" => {}
            "MainReportVersion" => {
                self.started.get_or_insert_with(std::time::Instant::now);
            }
            "FoundStats" => {
                self.parsed.get_or_insert_with(std::time::Instant::now);
            }
            _ if (name.ends_with("Result") || name == "SkippingDetails")
                && line.data.get("index").is_some() =>
            {
                self.done += 1;
                self.total = self.total.max(total.unwrap_or_default() as u32);
                changed = true;
            }
            _ => {}
        }
        if line.info.level == "debug" {
            return Parsed {
                text: None,
                progress_changed: changed,
            };
        }
        // `ts` is RFC 3339; show the time of day, as dbt's text format does.
        let time = line.info.ts.get(11..19).unwrap_or("");
        let text = if time.is_empty() {
            line.info.msg
        } else {
            format!("{time}  {}", line.info.msg)
        };
        Parsed {
            text: Some(text),
            progress_changed: changed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, msg: &str, data: serde_json::Value) -> String {
        serde_json::json!({
            "data": data,
            "info": { "name": name, "level": "info", "msg": msg, "ts": "2026-11-21T14:15:56.942574Z" }
        })
        .to_string()
    }

    #[test]
    fn node_results_advance_progress() {
        let mut progress = Progress::default();
        let concurrency = progress.read(&line(
            "ConcurrencyLine",
            "Concurrency: 4 threads",
            serde_json::json!({"node_count": 3}),
        ));
        assert!(concurrency.progress_changed);
        assert_eq!(
            concurrency.text.as_deref(),
            Some("14:15:56  Concurrency: 4 threads")
        );
        let start = progress.read(&line(
            "LogStartLine",
            "1 of 3 START",
            serde_json::json!({"index": 1, "total": 3}),
        ));
        assert!(!start.progress_changed);
        progress.read(&line(
            "LogModelResult",
            "1 of 3 OK",
            serde_json::json!({"index": 1, "total": 3}),
        ));
        progress.read(&line(
            "LogTestResult",
            "2 of 3 FAIL",
            serde_json::json!({"index": 2, "total": 3}),
        ));
        assert_eq!((progress.done, progress.total), (2, 3));
    }

    #[test]
    fn other_lines_pass_through() {
        let mut progress = Progress::default();
        assert_eq!(
            progress
                .read("Traceback (most recent call last):")
                .text
                .as_deref(),
            Some("Traceback (most recent call last):")
        );
        let debug = serde_json::json!({"data": {}, "info": {"name": "X", "level": "debug", "msg": "m", "ts": ""}}).to_string();
        assert_eq!(progress.read(&debug).text, None);
    }
}
