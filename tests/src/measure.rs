//! What the benchmarks (`slimci-perf`, `slimci-bench`) and the stub dbt measure with: the wall
//! clock in Unix milliseconds and the API's RFC 3339 times as the same; statistics over samples
//! (percentiles by nearest rank, the median); a process's memory and CPU time and the machine's
//! busy time and load from `/proc`; and the records the stub dbt appends, keyed by run id.

use std::path::Path;

use serde_json::Value;

// ---- clocks ----

/// The wall clock as Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// An RFC 3339 time of the API as Unix milliseconds.
pub fn ms_of(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.timestamp_millis())
}

// ---- statistics ----

/// The value at percentile `p` (0–100), nearest rank, of unsorted `values`; NaN for none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The 50th percentile by nearest rank: a sample itself (for an even count the lower of the
/// two middle ones), as the `p90` and `max` beside it are.
pub fn p50(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// The median: the middle sample, or the mean of the two middle ones; NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

// ---- processes and the machine (/proc) ----

/// A field of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`).
pub fn status_kb(pid: i32, field: &str) -> Option<u64> {
    status_field(pid, field)?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A field of `/proc/<pid>/status` as text (`Threads`, `State`), trimmed.
pub fn status_field(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|rest| rest.trim().to_owned())
}

/// kB as MB (1024 kB), NaN when unknown.
pub fn mb(kb: Option<u64>) -> f64 {
    kb.map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

/// The fields of `/proc/<pid>/stat` after the command name (which is in parentheses and may
/// hold spaces): the first is the state, `fields[11..=14]` utime, stime, cutime, cstime.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU time of a process in ms: its own, and that of its waited-for children (USER_HZ = 100).
pub fn cpu_ms(pid: i32) -> Option<(f64, f64)> {
    let fields = stat_fields(pid)?;
    let tick =
        |index: usize| -> Option<f64> { Some(fields.get(index)?.parse::<f64>().ok()? * 10.0) };
    Some((tick(11)? + tick(12)?, tick(13)? + tick(14)?))
}

/// Whether `pid` has exited: no such process, or a zombie (or dead) one not yet reaped.
pub fn process_gone(pid: i32) -> bool {
    stat_fields(pid)
        .and_then(|fields| fields.into_iter().next())
        .is_none_or(|state| state == "Z" || state == "X")
}

/// The pid of the first process whose command (`/proc/<pid>/comm`) is `name`.
pub fn pid_of_command(name: &str) -> Option<i32> {
    pids().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == name)
    })
}

/// Every pid in `/proc`.
pub fn pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
}

/// Busy CPU time of the whole machine in ms (`/proc/stat`): all but idle and iowait.
pub fn machine_busy_ms() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|value| value.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle) * 10.0)
}

/// The machine's 1-minute load average as `/proc/loadavg` writes it, `?` if unknown: other work
/// on the machine skews every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

// ---- the stub dbt's records ----

/// One line of the stub dbt's record file (`record` in `slimci_stub.json`).
pub struct StubRecord {
    /// The run whose build wrote it.
    pub run: String,
    /// `start`, `alive` or `end`.
    pub event: String,
    /// When, Unix ms.
    pub ms: i64,
}

/// Every record in the stub's record file, in the order written (none if it cannot be read).
pub fn stub_records(path: &Path) -> Vec<StubRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|entry| StubRecord {
            run: run_of_run_dir(entry["run_dir"].as_str().unwrap_or_default()),
            event: entry["event"].as_str().unwrap_or_default().to_owned(),
            ms: entry["ms"].as_i64().unwrap_or_default(),
        })
        .collect()
}

/// The first `event` of `run` among `records`, its ms.
pub fn stub_event(records: &[StubRecord], run: &str, event: &str) -> Option<i64> {
    records
        .iter()
        .find(|record| record.run == run && record.event == event)
        .map(|record| record.ms)
}

/// The run id of a build's run directory, `<work>/runs/<run id>-<attempt>`.
pub fn run_of_run_dir(run_dir: &str) -> String {
    let name = Path::new(run_dir)
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    name.rsplit_once('-')
        .map_or(name, |(run, _)| run)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_the_median_averages_the_middle_pair() {
        let values = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(p50(&values), 2.0);
        assert_eq!(percentile(&values, 90.0), 4.0);
        assert_eq!(percentile(&values, 100.0), 4.0);
        assert_eq!(median(&values), 2.5);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(p50(&[]).is_nan() && median(&[]).is_nan());
    }

    #[test]
    fn a_run_directory_names_its_run() {
        assert_eq!(
            run_of_run_dir("/work/runs/0193-abc-def-2"),
            "0193-abc-def".to_owned()
        );
        assert_eq!(run_of_run_dir("plain"), "plain".to_owned());
    }

    #[test]
    fn this_process_is_not_gone_and_has_memory() {
        let pid = std::process::id() as i32;
        assert!(!process_gone(pid));
        assert!(status_kb(pid, "VmRSS").is_some_and(|kb| kb > 0));
        assert!(cpu_ms(pid).is_some());
    }
}
