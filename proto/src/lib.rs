//! The wire contract between the slimci coordinator and its agents.
//!
//! This is the only crate whose types cross a process boundary. Every message carries
//! [`PROTOCOL_VERSION`] in a `protocol` field; [`decode`] refuses any other version with an error
//! that names both versions, and tolerates fields it does not know (so a newer peer may add
//! optional fields without a version bump). Job messages carry no secrets: credentials live in
//! the agent's own configuration.

mod ids;
mod job;
pub mod run_results;
mod topology;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use ids::{AgentName, Attempt, IdError, IsolationName, PrNumber, RepoName, RunId, Sha};
pub use job::{
    CheckedJob, GitTarget, Job, JobError, JobKind, ProductionStateRef, RepositoryWarehouse, RunKind,
};
pub use topology::{DEAD_REASON_HEADER, Topology};

/// The protocol version this build speaks. Bump it on any change a peer of the previous version
/// would misread.
pub const PROTOCOL_VERSION: u32 = 1;

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is not JSON with a numeric `protocol` field: {0}")]
    NoVersion(#[source] serde_json::Error),
    #[error("unsupported protocol version {found}; this build speaks version {supported}")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("malformed protocol {PROTOCOL_VERSION} message: {0}")]
    Malformed(#[source] serde_json::Error),
}

#[derive(Deserialize)]
struct VersionProbe {
    protocol: u32,
}

/// Wraps a message body with the protocol version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope<T> {
    pub protocol: u32,
    #[serde(flatten)]
    pub body: T,
}

/// Serializes `body` inside a versioned envelope.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a, T> {
        protocol: u32,
        #[serde(flatten)]
        body: &'a T,
    }
    serde_json::to_vec(&Out {
        protocol: PROTOCOL_VERSION,
        body,
    })
    .expect("protocol types always serialize")
}

/// Checks the version first, then decodes the body, so a peer of another version gets an error
/// about the version rather than about a field it happened to rename.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(DecodeError::NoVersion)?;
    if probe.protocol != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: probe.protocol,
            supported: PROTOCOL_VERSION,
        });
    }
    serde_json::from_slice(bytes).map_err(DecodeError::Malformed)
}

/// Messages on the job queue (one consumer takes each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgentMessage {
    Job(Job),
}

/// Messages broadcast to every agent on the control exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Stop the run if this agent is building it; the agent then reports `cancelled`.
    Cancel { run_id: RunId, reason: String },
}

/// An agent asks the coordinator for the right to build one attempt of a run (HTTP, because it
/// needs an answer: a run cancelled or superseded while queued must not build).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub run_id: RunId,
    pub attempt: Attempt,
    pub agent: AgentName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub granted: bool,
    /// Why the claim was refused, when it was.
    pub reason: Option<String>,
    /// A granted claim is a lease of this many seconds, renewed by heartbeats. An agent that
    /// cannot renew it stops the build before it runs out; the coordinator retries the run
    /// elsewhere only after it ran out.
    #[serde(default)]
    pub lease_secs: u64,
}

/// One attempt an agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    pub run_id: RunId,
    pub attempt: Attempt,
}

/// An agent renews the leases of the attempts it is building (HTTP, every third of a lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub agent: AgentName,
    pub leases: Vec<Lease>,
    /// What the agent is and how busy: the coordinator's fleet view. An idle agent sends a
    /// heartbeat with no leases just to say it is there. Absent from agents older than the
    /// fleet view; the coordinator then knows them only by their claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
}

/// An agent's own account of itself, sent with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's version (`slimci-agent --version`).
    pub version: String,
    /// Jobs it builds at once.
    pub slots: u16,
    /// Slots building now.
    pub busy: u16,
    /// It is shutting down: it finishes what it holds and takes no new job.
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The renewed leases run this long from now.
    pub lease_secs: u64,
    /// Attempts this agent no longer holds (retried elsewhere, or ended): stop building them.
    pub lost: Vec<Lease>,
}

/// The steps of a build, in order. Their timings are recorded per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Checkout,
    StateFetch,
    Deps,
    Profile,
    Build,
    Upload,
    /// A deploy's parse of production's code for CI builds (`partial_parse.msgpack`).
    SeedParse,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Checkout => "checkout",
            Phase::StateFetch => "state_fetch",
            Phase::Deps => "deps",
            Phase::Profile => "profile",
            Phase::Build => "build",
            Phase::Upload => "upload",
            Phase::SeedParse => "seed_parse",
        }
    }
}

/// How a run ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// dbt exited 0.
    Success,
    /// dbt exited 1: models or tests failed.
    Failed,
    /// dbt exited 2, or slimci could not run it (checkout, state, profile).
    Error,
    Cancelled,
    TimedOut,
}

impl RunResult {
    /// Maps dbt's documented exit codes: 0 success, 1 failures in the run, 2 anything else.
    pub fn from_dbt_exit_code(code: i32) -> RunResult {
        match code {
            0 => RunResult::Success,
            1 => RunResult::Failed,
            _ => RunResult::Error,
        }
    }
}

/// One node's outcome, from dbt's `run_results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeResult {
    pub unique_id: String,
    /// `model`, `test`, `seed`, `snapshot`, ... (the first part of the unique id).
    pub resource_type: String,
    /// dbt's status: `success`, `error`, `fail`, `warn`, `pass`, `skipped`, `no-op`, ...
    pub status: String,
    pub execution_time_s: f64,
    pub message: Option<String>,
    pub failures: Option<u64>,
    /// The relation the node wrote, `database.schema.identifier`, when it wrote one.
    pub relation: Option<String>,
    /// What the adapter said of the node's query, as dbt records it (`_message`, `code`,
    /// `rows_affected`; Snowflake's `query_id`), when it said anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_response: Option<serde_json::Map<String, serde_json::Value>>,
    /// When dbt started and finished the node (its `timing` in `run_results.json`: the start
    /// of the first step, the end of the last). Absent when dbt did not run it, and from older
    /// agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
}

/// The end of an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub result: RunResult,
    /// A one-line explanation for anything but success, meant for people.
    pub message: Option<String>,
    pub dbt_exit_code: Option<i32>,
    pub nodes: Vec<NodeResult>,
    /// CI runs: parents of selected nodes that were not built but read from production.
    #[serde(default)]
    pub deferred: Vec<String>,
    /// What the attempt cost its agent. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<AttemptUsage>,
}

/// What one attempt cost the agent that built it: the fleet's figures, reported with the
/// attempt's end so that one scrape of the coordinator sees every agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttemptUsage {
    /// Seconds the attempt held its slot, from the granted claim to its end.
    pub slot_busy_s: f64,
    /// Processes of the build the kernel killed for the memory limit.
    pub oom_kills: u64,
    /// Forks the build's pids limit refused.
    pub pids_limit_hits: u64,
}

/// The protections a build ran under, as the agent applied them: what the fleet really
/// enforces, per run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// dbt ran in a PID namespace of its own (its init's end kills every process in it).
    pub pid_namespace: bool,
    /// `v2`, `v1` or `none`.
    pub cgroup: String,
    pub memory_limit_bytes: Option<u64>,
    pub pids_limit: Option<u64>,
    /// `full`, `partial` or `none`.
    pub landlock: String,
    /// The kernel's landlock ABI, when a ruleset was enforced.
    pub landlock_abi: Option<u32>,
    /// The user dbt ran as.
    pub user: String,
    pub uid: u32,
    pub rlimit_nofile: u64,
    pub rlimit_nproc: Option<u64>,
    pub core_dumps: bool,
    /// What could not be applied, for people.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// dbt was pre-started for the slot: loaded under landlock rules covering every build of the
    /// agent, then, before reading the project, confined to this build's rules (`landlock`
    /// describes both; the kernel enforces both).
    #[serde(default)]
    pub prestarted: bool,
}

/// Which of the agent's caches an attempt could use: what made it fast, or why it was not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheReport {
    /// `hit` (the commit was in the agent's git cache) or `fetched`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<String>,
    /// `hit` or `downloaded` (CI runs: the production manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `hit` (packages restored), `installed` (`dbt deps` ran), or none without packages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deps: Option<String>,
    /// How dbt parsed the project: `partial` (a cached parse was reused), `full`, or
    /// `unknown` (dbt's log did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse: Option<String>,
    /// dbt's reason for a full parse ("saved manifest not found", "profile has changed", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_reason: Option<String>,
    /// The deploy that wrote the saved parse dbt was given, if one was: for a CI build,
    /// production's parse; for a deploy, the last deploy's own. Never a PR build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_from: Option<RunId>,
    /// Seconds from starting dbt to its first log line (loading Python and dbt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbt_startup_s: Option<f64>,
    /// Seconds dbt spent reading and parsing the project, up to `Found N models, ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_s: Option<f64>,
}

/// What an agent reports about an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventBody {
    /// Checkout is done: the exact commit being built.
    Started {
        sha: Sha,
    },
    PhaseStarted {
        phase: Phase,
    },
    PhaseFinished {
        phase: Phase,
        ok: bool,
        /// How long the phase took by the agent's monotonic clock (the events' `at` are wall
        /// clock, to the millisecond). Absent from older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_s: Option<f64>,
    },
    /// Log lines `first_line..first_line + lines.len()` of this attempt (0-based). Resending a
    /// batch is harmless: the coordinator keeps only lines it does not have.
    Log {
        first_line: u64,
        lines: Vec<String>,
    },
    /// Nodes finished of nodes selected, from dbt's structured log.
    Progress {
        done: u32,
        total: u32,
    },
    /// The sandbox a dbt invocation of this attempt ran in.
    Sandbox(SandboxReport),
    /// The caches the attempt used; sent once its build has run.
    Caches(CacheReport),
    Finished(Outcome),
    /// The agent gave the attempt up without a result (it is shutting down): its tree is gone,
    /// and the run should be retried elsewhere at once.
    Released {
        reason: String,
    },
}

/// Messages on the events queue: one agent's report about one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    pub run_id: RunId,
    pub attempt: Attempt,
    pub agent: AgentName,
    /// Per attempt, starting at 1 and increasing by one; duplicates are dropped by it.
    pub seq: u64,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub body: EventBody,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::sample_job;

    #[test]
    fn job_round_trips_with_version() {
        let message = ToAgentMessage::Job(sample_job());
        let bytes = encode(&message);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"protocol\":1"), "{text}");
        assert!(text.contains("\"type\":\"job\""), "{text}");
        assert_eq!(decode::<ToAgentMessage>(&bytes).unwrap(), message);
    }

    #[test]
    fn unknown_version_is_refused_by_name() {
        let mut value: serde_json::Value =
            serde_json::from_slice(&encode(&ToAgentMessage::Job(sample_job()))).unwrap();
        value["protocol"] = 99.into();
        let error = decode::<ToAgentMessage>(value.to_string().as_bytes()).unwrap_err();
        assert!(matches!(
            error,
            DecodeError::UnsupportedVersion {
                found: 99,
                supported: 1
            }
        ));
        assert_eq!(
            error.to_string(),
            "unsupported protocol version 99; this build speaks version 1"
        );
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let mut value: serde_json::Value =
            serde_json::from_slice(&encode(&ToAgentMessage::Job(sample_job()))).unwrap();
        value["added_in_a_later_minor"] = "ignored".into();
        assert!(decode::<ToAgentMessage>(value.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            decode::<ToAgentMessage>(b"\xff\x00garbage"),
            Err(DecodeError::NoVersion(_))
        ));
        assert!(matches!(
            decode::<ToAgentMessage>(br#"{"protocol":1,"type":"job"}"#),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn event_flattens_body() {
        let event = AgentEvent {
            run_id: RunId::new(),
            attempt: Attempt(2),
            agent: AgentName::parse("vm-1").unwrap(),
            seq: 3,
            at: Utc::now(),
            body: EventBody::Log {
                first_line: 10,
                lines: vec!["hello".into()],
            },
        };
        let bytes = encode(&event);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["event"], "log");
        assert_eq!(decode::<AgentEvent>(&bytes).unwrap(), event);
    }

    #[test]
    fn sandbox_reports_round_trip() {
        let event = AgentEvent {
            run_id: RunId::new(),
            attempt: Attempt(1),
            agent: AgentName::parse("vm-1").unwrap(),
            seq: 4,
            at: Utc::now(),
            body: EventBody::Sandbox(SandboxReport {
                pid_namespace: true,
                cgroup: "v1".into(),
                memory_limit_bytes: Some(1 << 30),
                pids_limit: Some(512),
                landlock: "full".into(),
                landlock_abi: Some(7),
                user: "slimci-build".into(),
                uid: 999,
                rlimit_nofile: 4096,
                rlimit_nproc: Some(512),
                core_dumps: false,
                warnings: vec![],
                prestarted: false,
            }),
        };
        let bytes = encode(&event);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["event"], "sandbox");
        assert_eq!(value["landlock_abi"], 7);
        assert_eq!(decode::<AgentEvent>(&bytes).unwrap(), event);
    }

    #[test]
    fn messages_of_agents_before_the_fleet_view_still_decode() {
        // A heartbeat without `status`, a phase without `duration_s`, an outcome without
        // `usage`, a node without times: what agents of the first protocol 1 builds send.
        let heartbeat: HeartbeatRequest =
            decode(br#"{"protocol":1,"agent":"vm-1","leases":[]}"#).unwrap();
        assert_eq!(heartbeat.status, None);
        let run_id = RunId::new();
        let phase: AgentEvent = decode(
            format!(r#"{{"protocol":1,"run_id":"{run_id}","attempt":1,"agent":"vm-1","seq":2,"at":"2026-01-01T00:00:00Z","event":"phase_finished","phase":"build","ok":true}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert!(matches!(
            phase.body,
            EventBody::PhaseFinished {
                duration_s: None,
                ..
            }
        ));
        let finished: AgentEvent = decode(
            format!(r#"{{"protocol":1,"run_id":"{run_id}","attempt":1,"agent":"vm-1","seq":3,"at":"2026-01-01T00:00:00Z","event":"finished","result":"success","message":null,"dbt_exit_code":0,"nodes":[{{"unique_id":"model.a.b","resource_type":"model","status":"success","execution_time_s":0.1,"message":null,"failures":null,"relation":null}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        let EventBody::Finished(outcome) = finished.body else {
            panic!("{finished:?}");
        };
        assert_eq!(outcome.usage, None);
        assert_eq!(outcome.nodes[0].started_at, None);
        // And the new fields are left out when absent, so older coordinators see nothing new.
        let text = String::from_utf8(encode(&HeartbeatRequest {
            agent: AgentName::parse("vm-1").unwrap(),
            leases: vec![],
            status: None,
        }))
        .unwrap();
        assert!(!text.contains("status"), "{text}");
    }

    #[test]
    fn dbt_exit_codes_map_to_results() {
        assert_eq!(RunResult::from_dbt_exit_code(0), RunResult::Success);
        assert_eq!(RunResult::from_dbt_exit_code(1), RunResult::Failed);
        assert_eq!(RunResult::from_dbt_exit_code(2), RunResult::Error);
        assert_eq!(RunResult::from_dbt_exit_code(-9), RunResult::Error);
    }

    #[test]
    fn job_carries_no_credential_fields() {
        let text = String::from_utf8(encode(&ToAgentMessage::Job(sample_job()))).unwrap();
        for word in ["password", "token", "secret", "private_key"] {
            assert!(!text.contains(word), "job message mentions {word}: {text}");
        }
    }
}
