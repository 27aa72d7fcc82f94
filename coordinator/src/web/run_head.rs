//! The facts at the top of a run's page: what the run is, where it stands, who or what
//! triggered it, the production state it compared against, its trace.

use slimci_client::{Backend, Waiting};
use slimci_proto::{RunKind, Topology};

use super::runs::seconds;
use super::{duration, github_web, short_sha, when};
use crate::app::AppState;
use crate::store::{Run, now_ms};

/// The facts at the top of a run's page.
pub struct Head {
    pub id: String,
    pub what: String,
    pub repository: String,
    pub kind: &'static str,
    pub pr: Option<u64>,
    pub pr_url: Option<String>,
    pub sha: Option<String>,
    pub sha_url: Option<String>,
    pub git_ref: String,
    pub isolation: Option<String>,
    pub status: &'static str,
    pub terminal: bool,
    pub message: Option<String>,
    pub attempt: u32,
    /// Who or what asked for the run, for people.
    pub triggered_by: String,
    /// Said when the coordinator retried the run after a lost attempt.
    pub retried: Option<String>,
    /// The run's OpenTelemetry trace id, when its trace is exported.
    pub trace_id: Option<String>,
    pub agent: Option<String>,
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub duration: Option<String>,
    pub timeout: String,
    /// The production run compared against, its commit, and the dbt Cloud run its manifest
    /// came from (production from dbt Cloud).
    pub compared_against: Option<(String, String)>,
    pub compared_cloud_run: Option<u64>,
    /// Where the run builds (`fleet`, or the dbt Cloud run), and why, for routed runs.
    pub backend: Option<String>,
    pub backend_reason: Option<String>,
    /// A publish that imported dbt Cloud's production manifest: that Cloud run.
    pub imported_cloud_run: Option<u64>,
    pub superseded_by: Option<String>,
    pub cancel_requested: bool,
    pub waiting: Option<String>,
    pub progress: (u32, u32),
    pub exit_code: Option<i32>,
    pub parse: Option<String>,
}

/// What the trigger line says of a run recorded before coordinators kept triggers.
const TRIGGER_NOT_RECORDED: &str =
    "not recorded (the run is older than this coordinator's record of triggers)";

/// The head of `run`'s page; `queue_position` while it is queued; `compared_cloud_run`, the
/// dbt Cloud run whose manifest the production state it compares against is.
pub fn head(
    state: &AppState,
    run: &Run,
    queue_position: Option<u32>,
    compared_cloud_run: Option<u64>,
) -> Head {
    let github = state
        .config
        .repository(run.repository.as_str())
        .and_then(|repository| repository.github.clone())
        .and_then(|full_name| github_web(state, &full_name));
    let what = match (run.kind, run.pr) {
        (RunKind::Ci, Some(pr)) => format!("CI of {} PR #{}", run.repository, pr.0),
        (RunKind::Teardown, Some(pr)) => format!("Teardown of {} PR #{}", run.repository, pr.0),
        (RunKind::Publish, _) => format!("Production manifest published for {}", run.repository),
        _ => format!("Deploy of {}", run.repository),
    };
    let parse = run
        .caches
        .as_deref()
        .and_then(|json| serde_json::from_str::<slimci_proto::CacheReport>(json).ok())
        .and_then(|caches| {
            let parse = caches.parse?;
            Some(match caches.parse_reason {
                Some(reason) => format!("{parse} ({reason})"),
                None => parse,
            })
        });
    let id = run.id.to_string();
    Head {
        what,
        repository: run.repository.to_string(),
        kind: run.kind.as_str(),
        pr: run.pr.map(|pr| pr.0),
        pr_url: github
            .as_ref()
            .zip(run.pr)
            .map(|(base, pr)| format!("{base}/pull/{}", pr.0)),
        sha: run.sha.as_ref().map(|sha| sha.to_string()),
        sha_url: github
            .as_ref()
            .zip(run.sha.as_ref())
            .map(|(base, sha)| format!("{base}/commit/{sha}")),
        git_ref: run.fetch_ref.clone(),
        isolation: run.isolation.as_ref().map(|name| name.to_string()),
        status: run.status.as_str(),
        terminal: run.status.is_terminal(),
        message: run.message.clone(),
        attempt: run.attempt.0,
        triggered_by: run
            .trigger
            .as_ref()
            .map_or_else(|| TRIGGER_NOT_RECORDED.to_owned(), |trigger| trigger.describe()),
        retried: (run.attempt.0 > 1).then(|| {
            format!(
                "retried by the coordinator as attempt {} after an earlier attempt was lost (its agent stopped or went silent)",
                run.attempt.0
            )
        }),
        trace_id: crate::telemetry::trace_id(run),
        agent: run.agent.clone(),
        created: when(run.created_ms),
        started: run.started_ms.map(when),
        finished: run.finished_ms.map(when),
        duration: seconds(run).map(duration),
        timeout: duration(run.timeout_secs as f64),
        compared_against: run.compared_against.as_ref().map(|stamp| {
            (
                stamp.deploy_run_id.to_string(),
                short_sha(stamp.sha.as_str()),
            )
        }),
        compared_cloud_run,
        backend: match (run.backend, run.dbt_cloud_run_id) {
            (Some(Backend::DbtCloud), Some(cloud_run)) => Some(format!("dbt Cloud, run {cloud_run}")),
            (Some(Backend::DbtCloud), None) => Some("dbt Cloud (being triggered)".to_owned()),
            (Some(Backend::Fleet), _) => Some("the fleet".to_owned()),
            (None, _) => None,
        },
        backend_reason: run.backend_reason.clone(),
        imported_cloud_run: (run.kind == RunKind::Publish)
            .then_some(run.dbt_cloud_run_id)
            .flatten(),
        superseded_by: run.superseded_by.map(|id| id.to_string()),
        cancel_requested: run.cancel_requested,
        waiting: queue_position.map(|position| {
            Waiting {
                jobs_queue: Topology::new(&state.config.amqp.prefix).jobs_queue(),
                agents_consuming: state.fleet.agents_consuming(),
                runs_ahead: position.saturating_sub(1),
                queued_for_secs: u64::try_from((now_ms() - run.created_ms) / 1000)
                    .unwrap_or_default(),
            }
            .explain()
        }),
        progress: (run.progress_done, run.progress_total),
        exit_code: run.dbt_exit_code,
        parse,
        id,
    }
}
