//! What the user API answers: a run (`GET /api/v1/runs/{id}`, and the short form in
//! `GET /api/v1/runs`), its phases, summary and artifacts, a repository and its production
//! state. Optional fields are `null` on the wire unless marked as left out.

use serde::{Deserialize, Serialize};
use slimci_proto::{Attempt, CacheReport, NodeResult, RunId, RunKind, SandboxReport};

use crate::backend::Backend;
use crate::status::RunStatus;
use crate::trigger::Trigger;
use crate::waiting::Waiting;

/// The production state a CI run compared against (`deploy_run_id`: the deploy or publish
/// run whose manifest it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView {
    pub deploy_run_id: RunId,
    pub sha: String,
    pub manifest_sha256: String,
}

/// One phase of one attempt (`checkout`, `state_fetch`, `profile`, `build`, `upload`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseView {
    pub attempt: Attempt,
    pub phase: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_s: Option<f64>,
    pub ok: Option<bool>,
}

/// Node counts for people: what the summary line and the PR comment say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub selected: u32,
    pub built: u32,
    pub tests_passed: u32,
    pub tests_failed: u32,
    pub warned: u32,
    pub errored: u32,
    pub skipped: u32,
}

/// A file a run uploaded (`manifest.json`, `run_results.json`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactView {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub url: String,
}

/// Nodes done of nodes selected; also the data of the log stream's `progress` event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u32,
    pub total: u32,
}

/// The data of the log stream's final `end` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEnd {
    pub message: Option<String>,
    pub status: RunStatus,
}

/// A run. The list answers without the fields marked "full view only".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: RunId,
    pub repository: String,
    pub kind: RunKind,
    pub pr: Option<u64>,
    pub sha: Option<String>,
    pub git_ref: String,
    pub isolation: Option<String>,
    pub status: RunStatus,
    pub message: Option<String>,
    pub attempt: Attempt,
    pub agent: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_s: Option<f64>,
    pub timeout_secs: u64,
    pub cancel_requested: bool,
    /// Position among runs waiting to start (1 = next), while queued (full view only).
    pub queue_position: Option<u32>,
    pub superseded_by: Option<RunId>,
    /// Parents read from production instead of being built.
    pub deferred: Vec<String>,
    pub production_state: Option<StateView>,
    pub progress: Progress,
    pub dbt_exit_code: Option<i32>,
    /// The protections the build ran under (the agent's report), once it started.
    pub sandbox: Option<SandboxReport>,
    /// The agent caches the build used, and whether dbt's parse was partial or full.
    pub caches: Option<CacheReport>,
    /// Why a queued run has not started (full view only, left out otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// Full view only, left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// Full view only, left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<Vec<PhaseView>>,
    /// Full view only, left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeResult>>,
    /// Full view only, left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Vec<ArtifactView>>,
    pub url: String,
    /// The run's OpenTelemetry trace (32 hex digits), when the coordinator exports traces.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Who or what asked for the run; `null` for runs recorded before coordinators kept it.
    #[serde(default)]
    pub trigger: Option<Trigger>,
    /// Where it builds, once decided: the fleet, or a run of the dbt Cloud CI job (`null` while
    /// a routed run waits for the decision, and for runs of coordinators before routing).
    #[serde(default)]
    pub backend: Option<Backend>,
    /// Why it builds there (routed runs).
    #[serde(default)]
    pub backend_reason: Option<String>,
    /// The dbt Cloud run that builds it (`backend: dbt_cloud`), or whose manifest a publish
    /// imported.
    #[serde(default)]
    pub dbt_cloud_run_id: Option<u64>,
}

/// `GET /api/v1/repositories/{name}/production-state`: the manifest CI runs compare against
/// (also the answer to publishing one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductionStateView {
    pub repository: String,
    /// The run whose `manifest.json` this is: a deploy, or a publish.
    pub deploy_run_id: RunId,
    /// That run's kind: `deploy` (slimci built production) or `publish` (a manifest made
    /// elsewhere, published with `slimci state publish`).
    pub run_kind: RunKind,
    pub sha: String,
    pub manifest_sha256: String,
    pub manifest_url: String,
    pub updated_at: String,
    /// The dbt Cloud run whose manifest this is (production from dbt Cloud).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbt_cloud_run_id: Option<u64>,
}

/// One entry of `GET /api/v1/repositories`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryView {
    pub name: String,
    pub clone_url: String,
    pub production_branch: String,
    pub project_dir: String,
    pub production_state: Option<ProductionStateView>,
}

/// `GET /api/v1/agents`: one agent of the fleet as the coordinator last heard from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    /// `idle`, `busy`, `draining`, or `offline` (not heard from for 30 s).
    pub state: String,
    /// None for an agent known only by its claims (older than the fleet view).
    pub version: Option<String>,
    pub slots: Option<u16>,
    pub busy_slots: u16,
    /// The runs it builds now.
    pub current_runs: Vec<RunId>,
    /// Its last heartbeat or claim (RFC 3339).
    pub last_heartbeat: String,
    pub draining: bool,
}
