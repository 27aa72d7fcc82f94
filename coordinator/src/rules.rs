//! The coordinator's decisions, as plain functions over plain data: which requests are
//! accepted, who may claim a run, what a cancel does, which agent events apply. No I/O here;
//! the HTTP, AMQP and SQLite adapters call these and act on the answer.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use slimci_proto::{
    Attempt, ClaimRequest, IsolationName, PrNumber, RepoName, RunId, RunKind, RunResult, Sha,
};

use crate::config::{Config, RepositoryConfig};

/// Where a run stands. The last six are terminal: nothing moves a run out of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Success,
    Failed,
    Error,
    Cancelled,
    Superseded,
    TimedOut,
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Success,
        RunStatus::Failed,
        RunStatus::Error,
        RunStatus::Cancelled,
        RunStatus::Superseded,
        RunStatus::TimedOut,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Success => "success",
            RunStatus::Failed => "failed",
            RunStatus::Error => "error",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Superseded => "superseded",
            RunStatus::TimedOut => "timed_out",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }

    pub fn from_result(result: RunResult) -> RunStatus {
        match result {
            RunResult::Success => RunStatus::Success,
            RunResult::Failed => RunStatus::Failed,
            RunResult::Error => RunStatus::Error,
            RunResult::Cancelled => RunStatus::Cancelled,
            RunResult::TimedOut => RunStatus::TimedOut,
        }
    }
}

/// `POST /api/v1/runs` as it arrives, before validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub repository: String,
    /// `ci` (default) or `deploy`.
    pub kind: Option<String>,
    pub pr: Option<u64>,
    pub sha: Option<String>,
    /// For a deploy: the branch to build (default: the production branch). For CI: the ref
    /// that holds the PR's commits (default `refs/pull/<pr>/head`, GitHub's convention).
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
}

/// A request the coordinator accepts, resolved against the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub repository: RepoName,
    pub kind: RunKind,
    pub pr: Option<PrNumber>,
    pub sha: Option<Sha>,
    pub fetch_ref: String,
    pub isolation: Option<IsolationName>,
    pub timeout_secs: u64,
}

/// Why a request was refused; shown to the requester as a 4xx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown repository `{name}`; configured: {configured}")]
    UnknownRepository { name: String, configured: String },
    #[error("unknown run kind `{0}`; use `ci` or `deploy`")]
    UnknownKind(String),
    #[error("a ci run needs the pull request number (`pr`)")]
    MissingPr,
    #[error("a ci run needs the head commit (`sha`) of the pull request")]
    MissingSha,
    #[error("pull request numbers start at 1")]
    ZeroPr,
    #[error(transparent)]
    Sha(#[from] slimci_proto::IdError),
    #[error("`{0}` is not a usable git ref")]
    BadRef(String),
    #[error("a deploy builds the production branch; it takes no `pr`")]
    DeployWithPr,
    #[error(
        "teardown runs are requested with POST /api/v1/repositories/{{name}}/pulls/{{pr}}/teardown"
    )]
    TeardownViaRuns,
}

fn valid_ref(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 200
        && !text.contains("..")
        && !text.starts_with('-')
        && !text.ends_with('/')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
}

fn qualify_branch(git_ref: &str) -> String {
    if git_ref.starts_with("refs/") {
        git_ref.to_owned()
    } else {
        format!("refs/heads/{git_ref}")
    }
}

/// Resolves a request against the configuration, or says what is wrong with it.
pub fn validate_request(
    config: &Config,
    request: &RunRequest,
) -> Result<ValidRequest, RequestError> {
    let repository: &RepositoryConfig =
        config
            .repository(&request.repository)
            .ok_or_else(|| RequestError::UnknownRepository {
                name: request.repository.clone(),
                configured: config
                    .repositories
                    .iter()
                    .map(|repository| repository.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
    let kind = match request.kind.as_deref() {
        None => RunKind::Ci,
        Some(text) => {
            RunKind::parse(text).ok_or_else(|| RequestError::UnknownKind(text.to_owned()))?
        }
    };
    let sha = request.sha.as_deref().map(Sha::parse).transpose()?;
    if let Some(git_ref) = &request.git_ref
        && !valid_ref(git_ref)
    {
        return Err(RequestError::BadRef(git_ref.clone()));
    }
    let timeout_secs = repository
        .run_timeout_secs
        .unwrap_or(config.limits.run_timeout_secs);
    match kind {
        RunKind::Ci => {
            let pr = PrNumber(request.pr.ok_or(RequestError::MissingPr)?);
            if pr.0 == 0 {
                return Err(RequestError::ZeroPr);
            }
            let sha = sha.ok_or(RequestError::MissingSha)?;
            let fetch_ref = match &request.git_ref {
                Some(git_ref) => qualify_branch(git_ref),
                None => format!("refs/pull/{pr}/head"),
            };
            Ok(ValidRequest {
                isolation: Some(IsolationName::for_pr(&repository.name, pr)),
                repository: repository.name.clone(),
                kind,
                pr: Some(pr),
                sha: Some(sha),
                fetch_ref,
                timeout_secs,
            })
        }
        RunKind::Teardown => Err(RequestError::TeardownViaRuns),
        RunKind::Deploy => {
            if request.pr.is_some() {
                return Err(RequestError::DeployWithPr);
            }
            let branch = request
                .git_ref
                .as_deref()
                .unwrap_or(&repository.production_branch);
            Ok(ValidRequest {
                repository: repository.name.clone(),
                kind,
                pr: None,
                sha,
                fetch_ref: qualify_branch(branch),
                isolation: None,
                timeout_secs,
            })
        }
    }
}

/// Dropping PR `pr`'s isolation: a run of the production branch's project (for its profile and
/// macros) that drops nothing but `pr_<slug>_<pr>`.
pub fn teardown_request(
    repository: &RepositoryConfig,
    pr: PrNumber,
    timeout_secs: u64,
) -> ValidRequest {
    ValidRequest {
        repository: repository.name.clone(),
        kind: RunKind::Teardown,
        pr: Some(pr),
        sha: None,
        fetch_ref: qualify_branch(&repository.production_branch),
        isolation: Some(IsolationName::for_pr(&repository.name, pr)),
        timeout_secs,
    }
}

/// What happens to an accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Queue,
    /// Recorded, but ends at once in `error` with this message.
    Refuse(String),
}

/// A CI run compares against production state; without any, `state:modified+` would select
/// everything and quietly build the whole project into the PR's isolation. Refuse instead.
pub fn admit(request: &ValidRequest, has_production_state: bool) -> Admission {
    if request.kind == RunKind::Ci && !has_production_state {
        return Admission::Refuse(format!(
            "repository `{}` has no production state yet: a CI run compares against the manifest of the last successful deploy. Run `slimci deploy --repo {}` first.",
            request.repository, request.repository
        ));
    }
    Admission::Queue
}

/// A run that has not ended, as submission and dispatch see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRun {
    pub id: RunId,
    pub repository: RepoName,
    pub kind: RunKind,
    pub pr: Option<PrNumber>,
    pub sha: Option<Sha>,
    pub isolation: Option<String>,
    pub status: RunStatus,
    /// Its job message is on the broker (or was taken from it): an agent may hold it.
    pub dispatched: bool,
}

/// What a new request does to the runs already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitDecision {
    /// The same commit is already queued or building: that run answers the request.
    Existing(RunId),
    /// A new run; these older runs of the same PR are superseded by it.
    Create { supersede: Vec<RunId> },
}

/// One PR, newer SHA: every unfinished run of an older SHA of that PR is superseded. The same
/// (repository, PR, SHA) arriving twice runs once; so does the same deploy commit.
pub fn decide_submit(request: &ValidRequest, active: &[ActiveRun]) -> SubmitDecision {
    let same_target = |run: &&ActiveRun| {
        run.repository == request.repository && run.kind == request.kind && run.pr == request.pr
    };
    let mut supersede = Vec::new();
    for run in active.iter().filter(same_target) {
        if request.sha.is_some() && run.sha == request.sha {
            return SubmitDecision::Existing(run.id);
        }
        if request.kind == RunKind::Ci {
            supersede.push(run.id);
        }
    }
    SubmitDecision::Create { supersede }
}

/// Caps on runs dispatched at once; 0 means no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    pub global: u32,
    pub per_repository: HashMap<RepoName, u32>,
}

/// Which waiting runs (oldest first) may go to the broker now, given those already out there.
///
/// A run waits while another run of its isolation is out (the old one's process tree may still
/// be writing there), while a deploy of its repository is out (deploys never overlap), or while
/// a cap is full. Runs that may go take their place in the counts for the ones behind them.
pub fn dispatch(waiting: &[ActiveRun], out: &[ActiveRun], caps: &Caps) -> Vec<RunId> {
    let mut total = out.len() as u32;
    let mut per_repository: HashMap<&RepoName, u32> = HashMap::new();
    let mut busy_isolations: HashSet<&str> = HashSet::new();
    let mut deploying: HashSet<&RepoName> = HashSet::new();
    for run in out {
        *per_repository.entry(&run.repository).or_default() += 1;
        if let Some(isolation) = &run.isolation {
            busy_isolations.insert(isolation);
        }
        if run.kind == RunKind::Deploy {
            deploying.insert(&run.repository);
        }
    }
    let mut chosen = Vec::new();
    for run in waiting {
        if caps.global > 0 && total >= caps.global {
            break;
        }
        let repository_count = per_repository.get(&run.repository).copied().unwrap_or(0);
        let repository_cap = caps
            .per_repository
            .get(&run.repository)
            .copied()
            .unwrap_or(0);
        if repository_cap > 0 && repository_count >= repository_cap {
            continue;
        }
        if run
            .isolation
            .as_deref()
            .is_some_and(|isolation| busy_isolations.contains(isolation))
        {
            continue;
        }
        if run.kind == RunKind::Deploy && deploying.contains(&run.repository) {
            continue;
        }
        chosen.push(run.id);
        total += 1;
        *per_repository.entry(&run.repository).or_default() += 1;
        if let Some(isolation) = &run.isolation {
            busy_isolations.insert(isolation);
        }
        if run.kind == RunKind::Deploy {
            deploying.insert(&run.repository);
        }
    }
    chosen
}

/// What a `pull_request` webhook asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullRequestAction {
    /// Build the head commit (superseding older ones).
    Build,
    /// A draft, and the repository does not build drafts.
    SkipDraft,
    /// Stop what is in flight (it became a draft).
    CancelInFlight,
    /// Stop what is in flight and drop the PR's isolation.
    Close,
    Ignore,
}

pub fn pull_request_action(action: &str, draft: bool, build_drafts: bool) -> PullRequestAction {
    match action {
        "opened" | "reopened" | "synchronize" | "ready_for_review" if draft && !build_drafts => {
            PullRequestAction::SkipDraft
        }
        "opened" | "reopened" | "synchronize" | "ready_for_review" => PullRequestAction::Build,
        "converted_to_draft" if !build_drafts => PullRequestAction::CancelInFlight,
        "closed" => PullRequestAction::Close,
        _ => PullRequestAction::Ignore,
    }
}

/// The parts of a run a claim is judged on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimView {
    pub status: RunStatus,
    pub attempt: Attempt,
    pub agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimDecision {
    Grant,
    Refuse(String),
}

/// Only the current attempt of a queued run can be claimed, and only once: this is the fence
/// that keeps two agents from building one run.
pub fn decide_claim(run: &ClaimView, claim: &ClaimRequest) -> ClaimDecision {
    if claim.attempt != run.attempt {
        return ClaimDecision::Refuse(format!(
            "attempt {} is stale; the run is on attempt {}",
            claim.attempt, run.attempt
        ));
    }
    match run.status {
        RunStatus::Queued => ClaimDecision::Grant,
        RunStatus::Running => ClaimDecision::Refuse(format!(
            "already claimed by {}",
            run.agent.as_deref().unwrap_or("another agent")
        )),
        terminal => ClaimDecision::Refuse(format!("the run is already {}", terminal.as_str())),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelDecision {
    /// Not started: the coordinator ends it now; an agent that later gets the job is refused
    /// its claim.
    EndNow,
    /// Building: tell the agents; the run ends when its agent reports the tree is gone.
    SignalAgents,
    AlreadyFinished(RunStatus),
}

pub fn decide_cancel(status: RunStatus) -> CancelDecision {
    match status {
        RunStatus::Queued => CancelDecision::EndNow,
        RunStatus::Running => CancelDecision::SignalAgents,
        terminal => CancelDecision::AlreadyFinished(terminal),
    }
}

/// What the coordinator does with an agent event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDisposition {
    Apply,
    /// Same or older sequence number: a resend.
    Duplicate,
    /// From an attempt that is not the run's current one (fenced off).
    StaleAttempt,
    /// The run already ended; late reports change nothing.
    RunEnded,
}

pub fn event_disposition(
    run_status: RunStatus,
    run_attempt: Attempt,
    last_seq: u64,
    event_attempt: Attempt,
    event_seq: u64,
) -> EventDisposition {
    if event_attempt != run_attempt {
        return EventDisposition::StaleAttempt;
    }
    if event_seq <= last_seq {
        return EventDisposition::Duplicate;
    }
    if run_status.is_terminal() {
        return EventDisposition::RunEnded;
    }
    EventDisposition::Apply
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimci_proto::{AgentName, RunId};

    fn config() -> Config {
        toml::from_str(
            r#"
            data_dir = "/tmp/x"
            [amqp]
            url = "amqp://127.0.0.1"
            [auth]
            agent_token = "0123456789abcdef"
            [[repository]]
            name = "shop"
            clone_url = "/srv/shop.git"
            production_branch = "trunk"
            "#,
        )
        .unwrap()
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn ci(pr: Option<u64>, sha: Option<&str>) -> RunRequest {
        RunRequest {
            repository: "shop".into(),
            pr,
            sha: sha.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn ci_request_resolves_ref_and_isolation() {
        let valid = validate_request(&config(), &ci(Some(7), Some(SHA))).unwrap();
        assert_eq!(valid.kind, RunKind::Ci);
        assert_eq!(valid.fetch_ref, "refs/pull/7/head");
        assert_eq!(valid.isolation.unwrap().as_str(), "pr_shop_7");
        assert_eq!(valid.timeout_secs, 3600);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let config = config();
        let unknown = RunRequest {
            repository: "nope".into(),
            ..ci(Some(1), Some(SHA))
        };
        assert_eq!(
            validate_request(&config, &unknown).unwrap_err().to_string(),
            "unknown repository `nope`; configured: shop"
        );
        assert_eq!(
            validate_request(&config, &ci(None, Some(SHA))),
            Err(RequestError::MissingPr)
        );
        assert_eq!(
            validate_request(&config, &ci(Some(1), None)),
            Err(RequestError::MissingSha)
        );
        assert_eq!(
            validate_request(&config, &ci(Some(0), Some(SHA))),
            Err(RequestError::ZeroPr)
        );
        assert!(matches!(
            validate_request(&config, &ci(Some(1), Some("abc"))),
            Err(RequestError::Sha(_))
        ));
        let bad_kind = RunRequest {
            kind: Some("nightly".into()),
            ..ci(Some(1), Some(SHA))
        };
        assert_eq!(
            validate_request(&config, &bad_kind),
            Err(RequestError::UnknownKind("nightly".into()))
        );
        let bad_ref = RunRequest {
            git_ref: Some("main; rm -rf /".into()),
            ..ci(Some(1), Some(SHA))
        };
        assert!(matches!(
            validate_request(&config, &bad_ref),
            Err(RequestError::BadRef(_))
        ));
    }

    #[test]
    fn deploy_defaults_to_the_production_branch() {
        let request = RunRequest {
            repository: "shop".into(),
            kind: Some("deploy".into()),
            ..Default::default()
        };
        let valid = validate_request(&config(), &request).unwrap();
        assert_eq!(valid.fetch_ref, "refs/heads/trunk");
        assert_eq!(valid.sha, None);
        assert_eq!(valid.isolation, None);
        let with_pr = RunRequest {
            pr: Some(3),
            ..request
        };
        assert_eq!(
            validate_request(&config(), &with_pr),
            Err(RequestError::DeployWithPr)
        );
    }

    #[test]
    fn ci_without_production_state_is_refused_with_advice() {
        let valid = validate_request(&config(), &ci(Some(7), Some(SHA))).unwrap();
        match admit(&valid, false) {
            Admission::Refuse(message) => {
                assert!(message.contains("slimci deploy --repo shop"), "{message}")
            }
            Admission::Queue => panic!("queued a CI run without production state"),
        }
        assert_eq!(admit(&valid, true), Admission::Queue);
        let deploy = ValidRequest {
            kind: RunKind::Deploy,
            ..valid
        };
        assert_eq!(admit(&deploy, false), Admission::Queue);
    }

    fn claim(attempt: u32) -> ClaimRequest {
        ClaimRequest {
            run_id: RunId::new(),
            attempt: Attempt(attempt),
            agent: AgentName::parse("a1").unwrap(),
        }
    }

    #[test]
    fn a_run_is_claimed_once_and_only_on_its_current_attempt() {
        let queued = ClaimView {
            status: RunStatus::Queued,
            attempt: Attempt(2),
            agent: None,
        };
        assert_eq!(decide_claim(&queued, &claim(2)), ClaimDecision::Grant);
        assert!(matches!(
            decide_claim(&queued, &claim(1)),
            ClaimDecision::Refuse(_)
        ));
        let running = ClaimView {
            status: RunStatus::Running,
            attempt: Attempt(2),
            agent: Some("a0".into()),
        };
        assert_eq!(
            decide_claim(&running, &claim(2)),
            ClaimDecision::Refuse("already claimed by a0".into())
        );
        let cancelled = ClaimView {
            status: RunStatus::Cancelled,
            ..queued
        };
        assert_eq!(
            decide_claim(&cancelled, &claim(2)),
            ClaimDecision::Refuse("the run is already cancelled".into())
        );
    }

    #[test]
    fn cancel_depends_on_where_the_run_is() {
        assert_eq!(decide_cancel(RunStatus::Queued), CancelDecision::EndNow);
        assert_eq!(
            decide_cancel(RunStatus::Running),
            CancelDecision::SignalAgents
        );
        assert_eq!(
            decide_cancel(RunStatus::Failed),
            CancelDecision::AlreadyFinished(RunStatus::Failed)
        );
    }

    #[test]
    fn events_are_fenced_and_deduplicated() {
        use EventDisposition::*;
        let run = |status| event_disposition(status, Attempt(2), 5, Attempt(2), 6);
        assert_eq!(run(RunStatus::Running), Apply);
        assert_eq!(run(RunStatus::Success), RunEnded);
        assert_eq!(
            event_disposition(RunStatus::Running, Attempt(2), 5, Attempt(2), 5),
            Duplicate
        );
        assert_eq!(
            event_disposition(RunStatus::Running, Attempt(2), 5, Attempt(1), 9),
            StaleAttempt
        );
    }

    fn active(kind: RunKind, pr: Option<u64>, sha: char, status: RunStatus) -> ActiveRun {
        let repository = RepoName::parse("shop").unwrap();
        ActiveRun {
            id: RunId::new(),
            isolation: pr.map(|pr| IsolationName::for_pr(&repository, PrNumber(pr)).to_string()),
            repository,
            kind,
            pr: pr.map(PrNumber),
            sha: Some(Sha::parse(&sha.to_string().repeat(40)).unwrap()),
            status,
            dispatched: true,
        }
    }

    #[test]
    fn a_newer_commit_supersedes_and_the_same_commit_runs_once() {
        let old = active(RunKind::Ci, Some(7), 'a', RunStatus::Running);
        let other_pr = active(RunKind::Ci, Some(8), 'b', RunStatus::Queued);
        let deploy = active(RunKind::Deploy, None, 'c', RunStatus::Running);
        let runs = [old.clone(), other_pr, deploy.clone()];
        let newer = validate_request(&config(), &ci(Some(7), Some(&"d".repeat(40)))).unwrap();
        assert_eq!(
            decide_submit(&newer, &runs),
            SubmitDecision::Create {
                supersede: vec![old.id]
            }
        );
        let same = validate_request(&config(), &ci(Some(7), Some(&"a".repeat(40)))).unwrap();
        assert_eq!(
            decide_submit(&same, &runs),
            SubmitDecision::Existing(old.id)
        );
        let same_deploy = RunRequest {
            repository: "shop".into(),
            kind: Some("deploy".into()),
            sha: Some("c".repeat(40)),
            ..Default::default()
        };
        let same_deploy = validate_request(&config(), &same_deploy).unwrap();
        assert_eq!(
            decide_submit(&same_deploy, &runs),
            SubmitDecision::Existing(deploy.id)
        );
        let next_deploy = ValidRequest {
            sha: None,
            ..same_deploy
        };
        assert_eq!(
            decide_submit(&next_deploy, &runs),
            SubmitDecision::Create { supersede: vec![] },
            "deploys queue, never supersede"
        );
    }

    #[test]
    fn dispatch_waits_for_the_isolation_deploys_and_caps() {
        let building = active(RunKind::Ci, Some(7), 'a', RunStatus::Running);
        let newer_same_pr = active(RunKind::Ci, Some(7), 'b', RunStatus::Queued);
        let pr8 = active(RunKind::Ci, Some(8), 'c', RunStatus::Queued);
        let pr9 = active(RunKind::Ci, Some(9), 'd', RunStatus::Queued);
        let waiting = [newer_same_pr.clone(), pr8.clone(), pr9.clone()];
        let no_caps = Caps::default();
        assert_eq!(
            dispatch(&waiting, std::slice::from_ref(&building), &no_caps),
            vec![pr8.id, pr9.id],
            "PR 7 waits for its old tree"
        );
        assert_eq!(
            dispatch(&waiting, &[], &no_caps),
            vec![newer_same_pr.id, pr8.id, pr9.id]
        );
        let global = Caps {
            global: 2,
            ..Caps::default()
        };
        assert_eq!(
            dispatch(&waiting, std::slice::from_ref(&building), &global),
            vec![pr8.id]
        );
        let per_repository = Caps {
            global: 0,
            per_repository: HashMap::from([(RepoName::parse("shop").unwrap(), 1)]),
        };
        assert_eq!(
            dispatch(&waiting, &[], &per_repository),
            vec![newer_same_pr.id]
        );

        let deploying = active(RunKind::Deploy, None, 'e', RunStatus::Running);
        let next_deploy = active(RunKind::Deploy, None, 'f', RunStatus::Queued);
        let later_deploy = active(RunKind::Deploy, None, '9', RunStatus::Queued);
        assert_eq!(
            dispatch(&[next_deploy.clone(), pr8.clone()], &[deploying], &no_caps),
            vec![pr8.id]
        );
        assert_eq!(
            dispatch(&[next_deploy.clone(), later_deploy], &[], &no_caps),
            vec![next_deploy.id],
            "two waiting deploys never go out together"
        );
    }

    #[test]
    fn pull_request_actions() {
        use PullRequestAction::*;
        assert_eq!(pull_request_action("opened", false, false), Build);
        assert_eq!(pull_request_action("synchronize", true, false), SkipDraft);
        assert_eq!(pull_request_action("synchronize", true, true), Build);
        assert_eq!(pull_request_action("ready_for_review", false, false), Build);
        assert_eq!(
            pull_request_action("converted_to_draft", true, false),
            CancelInFlight
        );
        assert_eq!(
            pull_request_action("converted_to_draft", true, true),
            Ignore
        );
        assert_eq!(pull_request_action("closed", false, false), Close);
        assert_eq!(pull_request_action("labeled", false, false), Ignore);
    }

    #[test]
    fn teardown_targets_only_the_prs_isolation() {
        let config = config();
        let request = teardown_request(&config.repositories[0], PrNumber(12), 600);
        assert_eq!(request.isolation.unwrap().as_str(), "pr_shop_12");
        assert_eq!(request.fetch_ref, "refs/heads/trunk");
        let via_runs = RunRequest {
            kind: Some("teardown".into()),
            ..ci(Some(12), Some(SHA))
        };
        assert_eq!(
            validate_request(&config, &via_runs),
            Err(RequestError::TeardownViaRuns)
        );
    }

    #[test]
    fn statuses_round_trip() {
        for status in RunStatus::ALL {
            assert_eq!(RunStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(
            RunStatus::ALL
                .iter()
                .filter(|status| !status.is_terminal())
                .count(),
            2
        );
    }
}
