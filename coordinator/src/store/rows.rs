//! The store's row types, and one decoder per row type (`*_from_row`), built from shared
//! column decoders so every column is read the same way wherever it appears.

use slimci_client::{Backend, Trigger};
use slimci_proto::{
    Attempt, IsolationName, NodeResult, Phase, PrNumber, RepoName, RunId, RunKind, Sha,
};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::{Result, corrupt};
use crate::rules::{self, RunStatus};

/// A repository's production state: the manifest of its last successful deploy or publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductionState {
    pub repository: RepoName,
    /// The run whose `manifest.json` this is (the column keeps its first name).
    pub deploy_run_id: RunId,
    /// That run's kind: `Deploy` (built by slimci) or `Publish` (made elsewhere).
    pub run_kind: RunKind,
    pub sha: Sha,
    pub manifest_sha256: String,
    pub updated_ms: i64,
    /// The dbt Cloud run whose manifest this is, for production from dbt Cloud.
    pub dbt_cloud_run_id: Option<u64>,
}

/// The production state stamped on a CI run as it is dispatched (the `state_*` columns): what
/// it compares against, even after a later deploy moved the repository's production state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductionStamp {
    pub deploy_run_id: RunId,
    pub sha: Sha,
    pub manifest_sha256: String,
}

/// What the coordinator knows of a pull request from webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub repository: RepoName,
    pub pr: PrNumber,
    /// GitHub says its `state` is `open` (else `closed`).
    pub open: bool,
    pub draft: bool,
    pub head_sha: Option<Sha>,
}

/// A run to insert.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub repository: RepoName,
    pub kind: RunKind,
    pub pr: Option<PrNumber>,
    pub sha: Option<Sha>,
    pub fetch_ref: String,
    pub isolation: Option<IsolationName>,
    pub timeout_secs: u64,
    pub production_state: Option<ProductionState>,
    /// `Queued`, or a terminal status for a request refused at admission.
    pub status: RunStatus,
    pub message: Option<String>,
    /// The W3C `traceparent` of the run's root span, when its trace is exported: written with
    /// the row, so the run's first dispatch already carries it.
    pub traceparent: Option<String>,
    /// Who or what asked for it.
    pub trigger: Trigger,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: RunId,
    pub repository: RepoName,
    pub kind: RunKind,
    pub pr: Option<PrNumber>,
    pub sha: Option<Sha>,
    pub fetch_ref: String,
    pub isolation: Option<IsolationName>,
    pub status: RunStatus,
    pub message: Option<String>,
    pub attempt: Attempt,
    pub agent: Option<String>,
    pub created_ms: i64,
    /// When the run last became queued: `created_ms`, or when the attempt before its current
    /// one was lost.
    pub queued_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub timeout_secs: u64,
    /// The production state a CI run compares against, stamped as it is dispatched.
    pub compared_against: Option<ProductionStamp>,
    pub progress_done: u32,
    pub progress_total: u32,
    /// The last applied event's sequence number of the current attempt; 0 before the first
    /// (agents number events from 1).
    pub last_seq: u64,
    pub cancel_requested: bool,
    pub dbt_exit_code: Option<i32>,
    /// The newer run of the same PR that replaces this one; set while this one's tree is
    /// being stopped, and it ends `superseded`.
    pub superseded_by: Option<RunId>,
    /// Parents read from production instead of being built (CI runs).
    pub deferred: Vec<String>,
    /// The status last reported to GitHub.
    pub github_reported: Option<RunStatus>,
    /// Its job message went to the broker (the `published` column).
    pub dispatched: bool,
    /// The agent's `SandboxReport` as JSON, once the build started.
    pub sandbox: Option<String>,
    /// The agent's `CacheReport` as JSON, once the build ran.
    pub caches: Option<String>,
    /// The W3C `traceparent` of the run's root span, when its trace is exported.
    pub traceparent: Option<String>,
    /// Who or what asked for it; none for runs recorded before triggers were (or written by a
    /// newer coordinator in a form this one does not know).
    pub trigger: Option<Trigger>,
    /// Where it builds, once routed (none for runs of repositories without routing).
    pub backend: Option<Backend>,
    pub backend_reason: Option<String>,
    /// The dbt Cloud run that builds it, or whose manifest a publish imported.
    pub dbt_cloud_run_id: Option<u64>,
}

impl Run {
    /// The run as the scheduling rules see it.
    pub fn active(&self) -> rules::ActiveRun {
        rules::ActiveRun {
            id: self.id,
            repository: self.repository.clone(),
            kind: self.kind,
            pr: self.pr,
            sha: self.sha.clone(),
            isolation: self.isolation.clone(),
            status: self.status,
            dispatched: self.dispatched,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PhaseRecord {
    pub attempt: Attempt,
    pub phase: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub ok: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub repository: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: u32,
}

/// A PR whose isolation may be left behind (see `Store::sweep_candidates`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepCandidate {
    pub repository: RepoName,
    pub pr: PrNumber,
    /// When its last CI build ended.
    pub last_finished_ms: i64,
}

/// Where a phase stands among `Phase`'s steps, for readers that sort the stored names; none
/// for a name no `Phase` is written as.
pub fn phase_order(name: &str) -> Option<usize> {
    [
        Phase::Checkout,
        Phase::StateFetch,
        Phase::Deps,
        Phase::Profile,
        Phase::Build,
        Phase::Upload,
        Phase::SeedParse,
    ]
    .iter()
    .position(|phase| phase.as_str() == name)
}

// ---- column decoders ----

fn text(row: &SqliteRow, column: &str) -> Result<Option<String>> {
    Ok(row.try_get::<Option<String>, _>(column)?)
}

fn run_id(row: &SqliteRow, column: &str) -> Result<Option<RunId>> {
    text(row, column)?
        .map(|id| RunId::parse(&id))
        .transpose()
        .map_err(corrupt)
}

fn required_run_id(row: &SqliteRow, column: &str) -> Result<RunId> {
    run_id(row, column)?.ok_or_else(|| corrupt(format!("{column} is empty")))
}

fn sha(row: &SqliteRow, column: &str) -> Result<Option<Sha>> {
    text(row, column)?
        .map(|sha| Sha::parse(&sha))
        .transpose()
        .map_err(corrupt)
}

fn repository(row: &SqliteRow, column: &str) -> Result<RepoName> {
    let name: String = row.try_get(column)?;
    RepoName::parse(&name).map_err(corrupt)
}

fn pr_number(row: &SqliteRow, column: &str) -> Result<Option<PrNumber>> {
    Ok(row
        .try_get::<Option<i64>, _>(column)?
        .map(|n| PrNumber(n as u64)))
}

fn kind(row: &SqliteRow) -> Result<RunKind> {
    let kind: String = row.try_get("kind")?;
    RunKind::parse(&kind).ok_or_else(|| corrupt(format!("run kind {kind}")))
}

fn status(row: &SqliteRow, column: &str) -> Result<Option<RunStatus>> {
    text(row, column)?
        .map(|status| {
            RunStatus::parse(&status).ok_or_else(|| corrupt(format!("run status {status}")))
        })
        .transpose()
}

fn required_status(row: &SqliteRow) -> Result<RunStatus> {
    status(row, "status")?.ok_or_else(|| corrupt("a run without status"))
}

fn isolation(row: &SqliteRow) -> Result<Option<IsolationName>> {
    text(row, "isolation")?
        .map(|name| IsolationName::parse(&name))
        .transpose()
        .map_err(corrupt)
}

fn attempt(row: &SqliteRow) -> Result<Attempt> {
    Ok(Attempt(row.try_get::<i64, _>("attempt")? as u32))
}

fn flag(row: &SqliteRow, column: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(column)? != 0)
}

fn production_stamp(row: &SqliteRow) -> Result<Option<ProductionStamp>> {
    match (
        run_id(row, "state_run_id")?,
        sha(row, "state_sha")?,
        text(row, "state_manifest_sha256")?,
    ) {
        (Some(deploy_run_id), Some(sha), Some(manifest_sha256)) => Ok(Some(ProductionStamp {
            deploy_run_id,
            sha,
            manifest_sha256,
        })),
        (None, None, None) => Ok(None),
        _ => Err(corrupt("a run with part of a production state stamp")),
    }
}

// ---- row decoders ----

pub(super) fn run_from_row(row: &SqliteRow) -> Result<Run> {
    Ok(Run {
        id: required_run_id(row, "id")?,
        repository: repository(row, "repository")?,
        kind: kind(row)?,
        pr: pr_number(row, "pr_number")?,
        sha: sha(row, "sha")?,
        fetch_ref: row.try_get("fetch_ref")?,
        isolation: isolation(row)?,
        status: required_status(row)?,
        message: text(row, "message")?,
        attempt: attempt(row)?,
        agent: text(row, "agent")?,
        created_ms: row.try_get("created_ms")?,
        queued_ms: row.try_get("queued_ms")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        timeout_secs: row.try_get::<i64, _>("timeout_secs")? as u64,
        compared_against: production_stamp(row)?,
        progress_done: row.try_get::<i64, _>("progress_done")? as u32,
        progress_total: row.try_get::<i64, _>("progress_total")? as u32,
        last_seq: row.try_get::<i64, _>("last_seq")? as u64,
        cancel_requested: flag(row, "cancel_requested")?,
        dbt_exit_code: row
            .try_get::<Option<i64>, _>("dbt_exit_code")?
            .map(|code| code as i32),
        superseded_by: run_id(row, "superseded_by")?,
        deferred: text(row, "deferred")?
            .map(|json| serde_json::from_str(&json))
            .transpose()
            .map_err(corrupt)?
            .unwrap_or_default(),
        github_reported: status(row, "github_reported")?,
        dispatched: flag(row, "published")?,
        sandbox: text(row, "sandbox")?,
        caches: text(row, "caches")?,
        traceparent: text(row, "traceparent")?,
        trigger: text(row, "triggered_by")?.and_then(|json| serde_json::from_str(&json).ok()),
        backend: text(row, "backend")?
            .map(|text| Backend::parse(&text).ok_or_else(|| corrupt(format!("backend `{text}`"))))
            .transpose()?,
        backend_reason: text(row, "backend_reason")?,
        dbt_cloud_run_id: row
            .try_get::<Option<i64>, _>("dbt_cloud_run_id")?
            .map(|id| id as u64),
    })
}

/// The columns `active_run_from_row` reads.
pub(super) const ACTIVE_RUN_COLUMNS: &str =
    "id, repository, kind, pr_number, sha, isolation, status, published";

pub(super) fn active_run_from_row(row: &SqliteRow) -> Result<rules::ActiveRun> {
    Ok(rules::ActiveRun {
        id: required_run_id(row, "id")?,
        repository: repository(row, "repository")?,
        kind: kind(row)?,
        pr: pr_number(row, "pr_number")?,
        sha: sha(row, "sha")?,
        isolation: isolation(row)?,
        status: required_status(row)?,
        dispatched: flag(row, "published")?,
    })
}

pub(super) fn phase_from_row(row: &SqliteRow) -> Result<PhaseRecord> {
    Ok(PhaseRecord {
        attempt: attempt(row)?,
        phase: row.try_get("phase")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        ok: row.try_get::<Option<i64>, _>("ok")?.map(|ok| ok != 0),
    })
}

pub(super) fn node_from_row(row: &SqliteRow) -> Result<NodeResult> {
    Ok(NodeResult {
        unique_id: row.try_get("unique_id")?,
        resource_type: row.try_get("resource_type")?,
        status: row.try_get("status")?,
        execution_time_s: row.try_get("execution_time_s")?,
        message: row.try_get("message")?,
        failures: row.try_get::<Option<i64>, _>("failures")?.map(|n| n as u64),
        relation: row.try_get("relation")?,
        adapter_response: row
            .try_get::<Option<String>, _>("adapter_response")?
            .map(|text| serde_json::from_str(&text).map_err(corrupt))
            .transpose()?,
        // A node's times travel in its trace; the store keeps its duration.
        started_at: None,
        completed_at: None,
    })
}

pub(super) fn artifact_from_row(row: &SqliteRow) -> Result<ArtifactRecord> {
    Ok(ArtifactRecord {
        name: row.try_get("name")?,
        size: row.try_get::<i64, _>("size")? as u64,
        sha256: row.try_get("sha256")?,
        created_ms: row.try_get("created_ms")?,
    })
}

pub(super) fn production_state_from_row(row: &SqliteRow) -> Result<ProductionState> {
    Ok(ProductionState {
        repository: repository(row, "repository")?,
        deploy_run_id: required_run_id(row, "deploy_run_id")?,
        run_kind: kind(row)?,
        sha: sha(row, "sha")?.ok_or_else(|| corrupt("production state without a commit"))?,
        manifest_sha256: row.try_get("manifest_sha256")?,
        updated_ms: row.try_get("updated_ms")?,
        dbt_cloud_run_id: row
            .try_get::<Option<i64>, _>("dbt_cloud_run_id")?
            .map(|id| id as u64),
    })
}

pub(super) fn pull_request_from_row(row: &SqliteRow) -> Result<PullRequest> {
    Ok(PullRequest {
        repository: repository(row, "repository")?,
        pr: pr_number(row, "pr")?.ok_or_else(|| corrupt("a pull request without number"))?,
        open: row.try_get::<String, _>("state")? == "open",
        draft: flag(row, "draft")?,
        head_sha: sha(row, "head_sha")?,
    })
}

pub(super) fn sweep_candidate_from_row(row: &SqliteRow) -> Result<SweepCandidate> {
    Ok(SweepCandidate {
        repository: repository(row, "repository")?,
        pr: pr_number(row, "pr_number")?.ok_or_else(|| corrupt("a sweep candidate without PR"))?,
        last_finished_ms: row.try_get("last_finished")?,
    })
}
