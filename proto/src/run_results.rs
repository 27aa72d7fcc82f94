//! dbt's `run_results.json`, read once for both sides: the agent turns its entries into the
//! `NodeResult`s it reports (and the nodes' spans), the coordinator draws the build's timeline
//! from the same entries (`thread_id`, and when each node ran). Pure: bytes in, entries out.
//!
//! dbt's file is an outside contract (DESIGN.md), so the reader is lenient where dbt versions
//! differ: fields it does not need are ignored, and a time without a zone (older dbt) is read
//! as UTC instead of failing the whole file.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Deserializer};

use crate::NodeResult;

/// The entries of a `run_results.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RunResults {
    pub results: Vec<RunResultEntry>,
}

/// One node as dbt wrote it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RunResultEntry {
    pub unique_id: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub execution_time: f64,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub failures: Option<u64>,
    #[serde(default)]
    pub relation_name: Option<String>,
    #[serde(default)]
    pub adapter_response: serde_json::Map<String, serde_json::Value>,
    /// The dbt thread that ran it (`Thread-3 (worker)`, ...).
    #[serde(default)]
    pub thread_id: Option<String>,
    /// dbt's steps of the node (`compile`, `execute`), each with its start and end; a node
    /// dbt skipped has none.
    #[serde(default)]
    pub timing: Vec<TimingStep>,
}

/// One step of a node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TimingStep {
    #[serde(default, deserialize_with = "lenient_instant")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "lenient_instant")]
    pub completed_at: Option<DateTime<Utc>>,
}

/// dbt writes `2024-05-01T10:00:00.123456Z`; older versions leave out the zone (UTC). A time
/// that is neither is no time, not a broken file.
fn lenient_instant<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    Ok(text.and_then(|text| {
        DateTime::parse_from_rfc3339(&text)
            .map(|at| at.with_timezone(&Utc))
            .or_else(|_| {
                NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f").map(|at| at.and_utc())
            })
            .ok()
    }))
}

impl RunResults {
    pub fn parse(bytes: &[u8]) -> Result<RunResults, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl RunResultEntry {
    /// When dbt started the node: the start of its first step.
    pub fn started_at(&self) -> Option<DateTime<Utc>> {
        self.timing.iter().filter_map(|step| step.started_at).min()
    }

    /// When dbt finished the node: the end of its last step.
    pub fn completed_at(&self) -> Option<DateTime<Utc>> {
        self.timing
            .iter()
            .filter_map(|step| step.completed_at)
            .max()
    }

    /// The node's outcome as an agent reports it.
    pub fn into_node_result(self) -> NodeResult {
        NodeResult {
            started_at: self.started_at(),
            completed_at: self.completed_at(),
            resource_type: self
                .unique_id
                .split('.')
                .next()
                .unwrap_or_default()
                .to_owned(),
            unique_id: self.unique_id,
            status: self.status,
            execution_time_s: self.execution_time,
            message: self.message,
            failures: self.failures,
            relation: self.relation_name,
            adapter_response: Some(self.adapter_response).filter(|response| !response.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Option<DateTime<Utc>> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn entries_say_when_and_where_each_node_ran() {
        let results = RunResults::parse(
            br#"{"metadata": {"dbt_version": "1.9.0"}, "elapsed_time": 1.0, "results": [
                {"unique_id": "model.shop.orders", "status": "success", "execution_time": 0.25,
                 "thread_id": "Thread-2 (worker)", "message": "OK",
                 "adapter_response": {"rows_affected": 3},
                 "timing": [
                    {"name": "compile", "started_at": "2026-01-02T03:04:05.100000Z", "completed_at": "2026-01-02T03:04:05.150000Z"},
                    {"name": "execute", "started_at": "2026-01-02T03:04:05.160000", "completed_at": "2026-01-02T03:04:05.350000"}]},
                {"unique_id": "test.shop.t", "status": "skipped", "timing": [],
                 "message": null, "failures": null, "relation_name": null}]}"#,
        )
        .unwrap();
        let [orders, skipped] = &results.results[..] else {
            panic!("two entries: {results:?}");
        };
        assert_eq!(orders.thread_id.as_deref(), Some("Thread-2 (worker)"));
        assert_eq!(orders.started_at(), at("2026-01-02T03:04:05.100Z"));
        assert_eq!(
            orders.completed_at(),
            at("2026-01-02T03:04:05.350Z"),
            "a time without a zone is UTC"
        );
        assert_eq!((skipped.started_at(), skipped.completed_at()), (None, None));
        let node = orders.clone().into_node_result();
        assert_eq!(node.resource_type, "model");
        assert_eq!(node.adapter_response.unwrap()["rows_affected"], 3);
        assert_eq!(skipped.clone().into_node_result().adapter_response, None);
        assert!(RunResults::parse(b"nope").is_err());
    }
}
