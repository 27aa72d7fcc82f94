//! One run that dbt Cloud builds for slimci, followed by the coordinator as if it were an agent
//! (`DBT_CLOUD_AGENT`): what it sees becomes that agent's events, applied through
//! `queue::handle_event` like any agent's, so a Cloud run's log, phases, nodes, artifacts,
//! ending (superseded, cancelled, timed out) and GitHub report follow the fleet's rules.
//!
//! - Trigger: the CI job is started with `cause` naming the slimci run, the commit, the PR and
//!   `schema_override` = the PR's isolation, so dbt Cloud builds where teardowns and the sweeper
//!   look. Before every trigger the job's newest runs are searched for that `cause`: a trigger
//!   whose answer was lost (a 5xx, a dropped connection, a coordinator restart) is found, not
//!   sent twice. Only rate limits are resent at once.
//! - Follow: every `run_poll_secs`, the Cloud run with its steps: status, step logs into the
//!   run's log (the same lines each time, so resending after a restart is harmless).
//! - Cancel: a user's cancel, a newer commit of the PR, or the run's timeout asks dbt Cloud to
//!   cancel (again every [`CANCEL_RESEND`]); the run ends only once dbt Cloud reports the Cloud
//!   run finished, so the isolation is not built twice at once.
//! - Finish: `run_results.json` and `manifest.json` become the run's artifacts and node results.

use std::time::{Duration, Instant};

use chrono::Utc;
use slimci_client::is_failure;
use slimci_proto::run_results::RunResults;
use slimci_proto::{AgentEvent, AgentName, EventBody, NodeResult, Outcome, Phase, RunResult};

use super::CloudRepository;
use super::client::{CloudError, CloudRun, CloudStatus, Trigger};
use crate::app::AppState;
use crate::queue::{EventError, handle_event};
use crate::store::{ArtifactRecord, DBT_CLOUD_AGENT, Run, now_ms};

/// How often a cancel is asked again while dbt Cloud has not confirmed it.
const CANCEL_RESEND: Duration = Duration::from_secs(10);
/// A trigger that fails (5xx, no answer) is tried again after 2, 4, ... up to this many seconds.
const TRIGGER_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A run dbt Cloud could not be made to start for this long ends `error`: once a search showed
/// dbt Cloud has no run for it, or when the searches themselves failed all that time.
const TRIGGER_PATIENCE: Duration = Duration::from_secs(15 * 60);
/// A cancel dbt Cloud has not confirmed this long after it was first asked ends the run
/// `error`, freeing its isolation.
const CANCEL_PATIENCE: Duration = Duration::from_secs(15 * 60);
/// Polls that try to fetch the artifacts of a finished Cloud run before it ends without them.
const ARTIFACT_TRIES: u32 = 5;
/// What slimci keeps of a Cloud run.
const ARTIFACTS: [&str; 2] = ["run_results.json", "manifest.json"];

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What the coordinator keeps in memory of one Cloud run it follows; rebuilt from the store
/// after a restart.
pub struct Mirror {
    /// The next event's sequence number (events the store applied are numbered up to
    /// `last_seq`).
    next_seq: u64,
    /// Log lines of the attempt already handed to the log store.
    lines_sent: usize,
    build_started: bool,
    next_poll: Instant,
    /// When a cancel was first asked of dbt Cloud, and last.
    cancel_first: Option<Instant>,
    cancel_sent: Option<Instant>,
    retry_trigger_at: Instant,
    trigger_failures: u32,
    /// Since when searching or triggering has been failing.
    failing_since: Option<Instant>,
    artifact_tries: u32,
    artifacts_kept: Vec<&'static str>,
}

impl Mirror {
    /// Starts following `run`, where the store says it stands.
    pub async fn attach(state: &AppState, run: &Run) -> Result<Mirror, MirrorError> {
        let phases = state.store.phases(run.id).await?;
        let build_started = phases
            .iter()
            .any(|phase| phase.attempt == run.attempt && phase.phase == Phase::Build.as_str());
        if run.last_seq > 0 {
            tracing::info!(run = %run.id, dbt_cloud_run = run.dbt_cloud_run_id, "re-attached to a run in dbt Cloud");
        }
        Ok(Mirror {
            next_seq: run.last_seq + 1,
            lines_sent: 0,
            build_started,
            next_poll: Instant::now(),
            cancel_first: None,
            cancel_sent: None,
            retry_trigger_at: Instant::now(),
            trigger_failures: 0,
            failing_since: None,
            artifact_tries: 0,
            artifacts_kept: Vec::new(),
        })
    }

    /// Does what is due for `run` now.
    pub async fn step(&mut self, state: &AppState, run: &Run) -> Result<(), MirrorError> {
        let Some(cloud) = state.dbt_cloud.repository(&run.repository) else {
            let message = "the repository has no [repository.dbt_cloud] section any more, so slimci cannot reach dbt Cloud to follow or cancel this run; a dbt Cloud run it started, if any, is left as it is";
            return self
                .finish(
                    state,
                    run,
                    RunResult::Error,
                    Some(message.to_owned()),
                    Vec::new(),
                )
                .await;
        };
        match (run.dbt_cloud_run_id, cloud.config.ci_job_id) {
            (Some(cloud_run), _) => self.follow(state, run, cloud, cloud_run).await,
            (None, Some(job)) => self.trigger(state, run, cloud, job).await,
            (None, None) => {
                let message = "the repository has no dbt_cloud.ci_job_id any more, so slimci cannot start this run in dbt Cloud";
                self.finish(
                    state,
                    run,
                    RunResult::Error,
                    Some(message.to_owned()),
                    Vec::new(),
                )
                .await
            }
        }
    }

    async fn trigger(
        &mut self,
        state: &AppState,
        run: &Run,
        cloud: &CloudRepository,
        job: u64,
    ) -> Result<(), MirrorError> {
        if Instant::now() < self.retry_trigger_at {
            return Ok(());
        }
        let cause = cause_of(run);
        // A trigger of ours dbt Cloud carried out though its answer never came back. Until this
        // search succeeds, whether such a run exists is unknown, and nothing else is decided.
        match cloud.client.recent_runs(job).await {
            Ok(recent) => {
                if let Some(found) = recent.iter().find(|found| found.cause() == Some(&cause)) {
                    tracing::info!(run = %run.id, dbt_cloud_run = found.id, "found the dbt Cloud run triggered for it");
                    state.store.set_dbt_cloud_run(run.id, found.id).await?;
                    let _ = state.changes.send(run.id);
                    return Ok(());
                }
            }
            Err(error) => {
                self.back_off(run, &error);
                // Whether dbt Cloud has a run for it stays unknown; a token revoked, or a dbt
                // Cloud down for good, must not hold the PR's isolation (and a user's cancel)
                // for ever.
                if self.out_of_patience() {
                    let message = format!(
                        "dbt Cloud did not answer slimci's search of CI job {job}'s runs for {} minutes ({error}); slimci stopped waiting. A dbt Cloud run with cause \"{cause}\", if there is one, may still be building",
                        TRIGGER_PATIENCE.as_secs() / 60
                    );
                    return self
                        .finish(state, run, RunResult::Error, Some(message), Vec::new())
                        .await;
                }
                return Ok(());
            }
        }
        // Known now: dbt Cloud has no run for it.
        if run.cancel_requested {
            let message = "cancelled before dbt Cloud started building it".to_owned();
            return self
                .finish(state, run, RunResult::Cancelled, Some(message), Vec::new())
                .await;
        }
        if timed_out(run) {
            let message = format!(
                "timed out after {}s before dbt Cloud started building it",
                run.timeout_secs
            );
            return self
                .finish(state, run, RunResult::TimedOut, Some(message), Vec::new())
                .await;
        }
        if self.out_of_patience() {
            let message = format!(
                "dbt Cloud could not be made to start CI job {job} for {} minutes (the coordinator's log says why); it has no run for this one",
                TRIGGER_PATIENCE.as_secs() / 60
            );
            return self
                .finish(state, run, RunResult::Error, Some(message), Vec::new())
                .await;
        }
        let trigger = Trigger {
            cause,
            git_sha: run.sha.as_ref().map(ToString::to_string),
            git_branch: None,
            github_pull_request_id: run.pr.map(|pr| pr.0),
            gitlab_merge_request_id: None,
            schema_override: run.isolation.as_ref().map(ToString::to_string),
        };
        match cloud.client.trigger(job, &trigger).await {
            Ok(started) => {
                tracing::info!(run = %run.id, dbt_cloud_run = started.id, job, "dbt Cloud is building it");
                state.store.set_dbt_cloud_run(run.id, started.id).await?;
                let _ = state.changes.send(run.id);
                Ok(())
            }
            // A 4xx other than a rate limit: dbt Cloud refused, and made nothing.
            Err(error) if error.is_permanent() => {
                let message = format!("dbt Cloud refused to start CI job {job}: {error}");
                self.finish(state, run, RunResult::Error, Some(message), Vec::new())
                    .await
            }
            Err(error) => {
                self.back_off(run, &error);
                Ok(())
            }
        }
    }

    /// Whether searching or triggering has been failing for [`TRIGGER_PATIENCE`].
    fn out_of_patience(&self) -> bool {
        self.failing_since
            .is_some_and(|since| since.elapsed() >= TRIGGER_PATIENCE)
    }

    /// After a failed search or trigger: look (and maybe trigger) again after 2, 4, ... 60 s.
    fn back_off(&mut self, run: &Run, error: &CloudError) {
        self.failing_since.get_or_insert_with(Instant::now);
        self.trigger_failures += 1;
        let wait = Duration::from_secs(1 << self.trigger_failures.min(6)).min(TRIGGER_BACKOFF_MAX);
        self.retry_trigger_at = Instant::now() + wait;
        tracing::warn!(run = %run.id, %error, retry_in = ?wait, "cannot start the dbt Cloud CI job yet; will look for its run, then trigger again");
    }

    async fn follow(
        &mut self,
        state: &AppState,
        run: &Run,
        cloud: &CloudRepository,
        cloud_run: u64,
    ) -> Result<(), MirrorError> {
        if Instant::now() < self.next_poll {
            return Ok(());
        }
        self.next_poll = Instant::now() + Duration::from_secs(cloud.config.run_poll_secs);
        let timed_out = timed_out(run);
        if (run.cancel_requested || timed_out)
            && self
                .cancel_sent
                .is_none_or(|sent| sent.elapsed() >= CANCEL_RESEND)
        {
            self.cancel_first.get_or_insert_with(Instant::now);
            match cloud.client.cancel(cloud_run).await {
                Ok(_) => {
                    tracing::info!(run = %run.id, dbt_cloud_run = cloud_run, timed_out, "asked dbt Cloud to cancel");
                    self.cancel_sent = Some(Instant::now());
                }
                Err(error) => {
                    tracing::warn!(run = %run.id, dbt_cloud_run = cloud_run, %error, "cannot ask dbt Cloud to cancel yet")
                }
            }
        }
        // A cancel dbt Cloud never confirms must not hold the PR's isolation for ever.
        if let Some(asked) = self.cancel_first
            && asked.elapsed() >= CANCEL_PATIENCE
        {
            let message = format!(
                "dbt Cloud did not confirm the cancel of run {cloud_run} within {} minutes; slimci stopped waiting, and the run may still be building in dbt Cloud",
                CANCEL_PATIENCE.as_secs() / 60
            );
            return self
                .finish(state, run, RunResult::Error, Some(message), Vec::new())
                .await;
        }
        let seen = match cloud.client.run(cloud_run).await {
            Ok(seen) => seen,
            Err(error) if error.is_not_found() => {
                let message = format!("dbt Cloud no longer shows run {cloud_run}: {error}");
                return self
                    .finish(state, run, RunResult::Error, Some(message), Vec::new())
                    .await;
            }
            // Anything else (a rate limit, a 5xx, a token refused) may pass, and the Cloud run
            // may be building all the while: the run stays, and is looked at again.
            Err(error) => {
                tracing::warn!(run = %run.id, dbt_cloud_run = cloud_run, %error, "cannot read the dbt Cloud run; looking again later");
                return Ok(());
            }
        };
        let Some(status) = seen.status() else {
            tracing::warn!(run = %run.id, dbt_cloud_run = cloud_run, status = seen.status, "dbt Cloud reports a status its API does not document; looking again later");
            return Ok(());
        };
        // dbt Cloud built something once the run was running, or when it ended with steps (it
        // may have run between two polls); a run cancelled in its queue built nothing.
        let built =
            status == CloudStatus::Running || (status.is_finished() && !seen.run_steps.is_empty());
        if !self.build_started && built {
            self.emit(
                state,
                run,
                EventBody::PhaseStarted {
                    phase: Phase::Build,
                },
            )
            .await?;
            self.build_started = true;
        }
        let lines = log_lines(&seen);
        if lines.len() > self.lines_sent {
            let first_line = self.lines_sent as u64;
            let lines = lines[self.lines_sent..].to_vec();
            let count = lines.len();
            self.emit(state, run, EventBody::Log { first_line, lines })
                .await?;
            self.lines_sent += count;
        }
        if !status.is_finished() {
            return Ok(());
        }
        let Some(nodes) = self.keep_artifacts(state, run, cloud, cloud_run).await else {
            return Ok(());
        };
        let (result, message) = conclusion(run, &seen, status, timed_out, &nodes);
        if self.build_started {
            self.emit(
                state,
                run,
                EventBody::PhaseFinished {
                    phase: Phase::Build,
                    ok: result == RunResult::Success,
                    duration_s: None,
                },
            )
            .await?;
        }
        self.finish(state, run, result, message, nodes).await
    }

    /// The Cloud run's `run_results.json` and `manifest.json` as the run's artifacts (those it
    /// has: a run cancelled before dbt ran has none); the node results read from the first.
    /// None while an artifact could not be fetched for a passing reason: the next poll tries
    /// again, [`ARTIFACT_TRIES`] times in all.
    async fn keep_artifacts(
        &mut self,
        state: &AppState,
        run: &Run,
        cloud: &CloudRepository,
        cloud_run: u64,
    ) -> Option<Vec<NodeResult>> {
        let limit = state.config.limits.max_artifact_bytes;
        self.artifact_tries += 1;
        let last_try = self.artifact_tries >= ARTIFACT_TRIES;
        for name in ARTIFACTS {
            if self.artifacts_kept.contains(&name) {
                continue;
            }
            let stored = match cloud.client.artifact(cloud_run, name).await {
                Ok(body) => state.artifacts.put(run.id, name, body, limit).await,
                Err(error) if error.is_permanent() || last_try => {
                    tracing::info!(run = %run.id, dbt_cloud_run = cloud_run, artifact = name, %error, "no artifact from dbt Cloud");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(run = %run.id, dbt_cloud_run = cloud_run, artifact = name, %error, "cannot fetch an artifact from dbt Cloud yet; trying again");
                    return None;
                }
            };
            let stored = match stored {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::warn!(run = %run.id, artifact = name, %error, "cannot keep a dbt Cloud artifact");
                    continue;
                }
            };
            let record = ArtifactRecord {
                name: name.to_owned(),
                size: stored.size,
                sha256: stored.sha256,
                created_ms: now_ms(),
            };
            if let Err(error) = state.store.record_artifact(run.id, &record).await {
                tracing::warn!(run = %run.id, artifact = name, %error, "cannot record a dbt Cloud artifact");
            }
            self.artifacts_kept.push(name);
        }
        let Ok(path) = state.artifacts.path(run.id, ARTIFACTS[0]) else {
            return Some(Vec::new());
        };
        let Ok(bytes) = tokio::fs::read(&path).await else {
            return Some(Vec::new());
        };
        Some(match RunResults::parse(&bytes) {
            Ok(results) => results
                .results
                .into_iter()
                .map(|entry| entry.into_node_result())
                .collect(),
            Err(error) => {
                tracing::warn!(run = %run.id, %error, "dbt Cloud's run_results.json cannot be read");
                Vec::new()
            }
        })
    }

    async fn finish(
        &mut self,
        state: &AppState,
        run: &Run,
        result: RunResult,
        message: Option<String>,
        nodes: Vec<NodeResult>,
    ) -> Result<(), MirrorError> {
        let outcome = Outcome {
            result,
            message,
            dbt_exit_code: None,
            nodes,
            deferred: Vec::new(),
            usage: None,
        };
        self.emit(state, run, EventBody::Finished(outcome)).await
    }

    async fn emit(
        &mut self,
        state: &AppState,
        run: &Run,
        body: EventBody,
    ) -> Result<(), MirrorError> {
        let event = AgentEvent {
            run_id: run.id,
            attempt: run.attempt,
            agent: cloud_agent(),
            seq: self.next_seq,
            at: Utc::now(),
            body,
        };
        handle_event(state, &event).await?;
        self.next_seq += 1;
        Ok(())
    }
}

/// Whether `run` has been going longer than its timeout.
fn timed_out(run: &Run) -> bool {
    run.started_ms
        .is_some_and(|started| now_ms() - started > (run.timeout_secs as i64) * 1000)
}

fn cloud_agent() -> AgentName {
    AgentName::parse(DBT_CLOUD_AGENT).expect("a valid agent name")
}

/// The `cause` a run's trigger carries, and by which it is found again (dbt Cloud keeps up to
/// 255 characters).
fn cause_of(run: &Run) -> String {
    let mut cause = format!("slimci run {} attempt {}", run.id, run.attempt.0);
    if let Some(pr) = run.pr {
        cause.push_str(&format!(": {} PR #{pr}", run.repository));
    }
    if let Some(sha) = &run.sha {
        cause.push_str(&format!(
            " at {}",
            &sha.as_str()[..12.min(sha.as_str().len())]
        ));
    }
    cause
}

/// The run's log, from the Cloud run's steps: a first line naming the Cloud run, then each
/// step's name and its log. The same lines each time it is read, with new ones at the end: a
/// step still going gives only its complete lines, since its last one may still grow, and ends
/// the log for now (steps run one after another, so a later step's lines wait for it).
fn log_lines(seen: &CloudRun) -> Vec<String> {
    let job = seen
        .job_definition_id
        .map(|job| format!(" of CI job {job}"))
        .unwrap_or_default();
    let mut lines = vec![match &seen.href {
        Some(href) => format!("dbt Cloud run {}{job}: {href}", seen.id),
        None => format!("dbt Cloud run {}{job}", seen.id),
    }];
    let run_finished = seen.status().is_some_and(CloudStatus::is_finished);
    let mut steps: Vec<_> = seen.run_steps.iter().collect();
    steps.sort_by_key(|step| step.index);
    for step in steps {
        lines.push(format!("== dbt Cloud step {}: {}", step.index, step.name));
        let finished = run_finished
            || CloudStatus::from_code(step.status).is_some_and(CloudStatus::is_finished);
        let logs = step.logs.as_deref().unwrap_or_default();
        let complete = if finished || logs.ends_with('\n') {
            logs
        } else {
            logs.rsplit_once('\n').map_or("", |(complete, _)| complete)
        };
        lines.extend(complete.lines().map(str::to_owned));
        if !finished {
            break;
        }
    }
    lines
}

/// What a finished Cloud run means for the slimci run.
fn conclusion(
    run: &Run,
    seen: &CloudRun,
    status: CloudStatus,
    timed_out: bool,
    nodes: &[NodeResult],
) -> (RunResult, Option<String>) {
    let id = seen.id;
    match status {
        CloudStatus::Success => (RunResult::Success, None),
        CloudStatus::Cancelled if timed_out && !run.cancel_requested => (
            RunResult::TimedOut,
            Some(format!(
                "timed out after {}s; dbt Cloud run {id} was cancelled",
                run.timeout_secs
            )),
        ),
        CloudStatus::Cancelled if run.cancel_requested => (
            RunResult::Cancelled,
            Some(format!("cancelled; dbt Cloud confirmed run {id} cancelled")),
        ),
        CloudStatus::Cancelled => (
            RunResult::Cancelled,
            Some(format!("dbt Cloud run {id} was cancelled in dbt Cloud")),
        ),
        _ => {
            let failed = nodes.iter().filter(|node| is_failure(node)).count();
            if failed > 0 {
                (
                    RunResult::Failed,
                    Some(format!(
                        "dbt Cloud run {id}: {failed} of {} nodes failed",
                        nodes.len()
                    )),
                )
            } else {
                let step = seen
                    .run_steps
                    .iter()
                    .find(|step| step.status == CloudStatus::Error.code())
                    .map(|step| format!(" at step {} ({})", step.index, step.name))
                    .unwrap_or_default();
                (
                    RunResult::Error,
                    Some(format!("dbt Cloud run {id} ended in error{step}")),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbt_cloud::client::CloudRunStep;

    fn seen(status: i64, steps: &[(&str, i64, &str)]) -> CloudRun {
        CloudRun {
            id: 70_001,
            job_definition_id: Some(12),
            environment_id: None,
            status,
            git_sha: None,
            git_branch: None,
            status_humanized: None,
            created_at: None,
            finished_at: None,
            href: Some("https://cloud.getdbt.com/deploy/1/projects/2/runs/70001/".to_owned()),
            run_steps: steps
                .iter()
                .enumerate()
                .map(|(index, (name, status, logs))| CloudRunStep {
                    index: index as i64 + 1,
                    name: (*name).to_owned(),
                    status: *status,
                    logs: Some((*logs).to_owned()),
                })
                .collect(),
            trigger: None,
        }
    }

    #[test]
    fn the_log_is_the_same_lines_each_time_with_new_ones_at_the_end() {
        let early = log_lines(&seen(
            3,
            &[
                ("Clone git repository", 10, "Cloned\nok"),
                ("Invoke dbt with `dbt build`", 3, "1 of 2 OK\n2 of 2 STA"),
            ],
        ));
        let later = log_lines(&seen(
            10,
            &[
                ("Clone git repository", 10, "Cloned\nok"),
                ("Invoke dbt with `dbt build`", 10, "1 of 2 OK\n2 of 2 OK"),
            ],
        ));
        // The running step's unfinished last line is held back.
        assert_eq!(early.last().map(String::as_str), Some("1 of 2 OK"));
        // A step still going without its logs yet holds back the steps after it, whose lines
        // would otherwise land before its own.
        let waiting = log_lines(&seen(
            3,
            &[
                ("Clone git repository", 10, "Cloned\nok"),
                ("Invoke dbt with `dbt deps`", 3, ""),
                ("Invoke dbt with `dbt build`", 1, "queued"),
            ],
        ));
        assert_eq!(
            waiting.last().map(String::as_str),
            Some("== dbt Cloud step 2: Invoke dbt with `dbt deps`")
        );
        assert_eq!(later[..early.len()], early[..]);
        assert_eq!(
            later,
            [
                "dbt Cloud run 70001 of CI job 12: https://cloud.getdbt.com/deploy/1/projects/2/runs/70001/",
                "== dbt Cloud step 1: Clone git repository",
                "Cloned",
                "ok",
                "== dbt Cloud step 2: Invoke dbt with `dbt build`",
                "1 of 2 OK",
                "2 of 2 OK",
            ]
        );
    }
}
