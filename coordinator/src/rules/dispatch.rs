//! Which runs go where: what a new request does to the runs already there (supersede, or
//! answer with the same commit's run), and which waiting runs may go to the broker now.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;

use slimci_proto::{IsolationName, PrNumber, RepoName, RunId, RunKind, Sha};

use super::RunStatus;
use super::request::ValidRequest;

/// A run that has not ended, as submission and dispatch see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRun {
    pub id: RunId,
    pub repository: RepoName,
    pub kind: RunKind,
    pub pr: Option<PrNumber>,
    pub sha: Option<Sha>,
    pub isolation: Option<IsolationName>,
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

/// Caps on runs dispatched at once. No entry (or `None`) means no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    pub global: Option<NonZeroU32>,
    pub per_repository: HashMap<RepoName, NonZeroU32>,
}

impl Caps {
    /// Caps from configured numbers, where the configuration's 0 means "no cap".
    pub fn from_configured(
        global: u32,
        per_repository: impl IntoIterator<Item = (RepoName, u32)>,
    ) -> Caps {
        Caps {
            global: NonZeroU32::new(global),
            per_repository: per_repository
                .into_iter()
                .filter_map(|(repository, cap)| Some((repository, NonZeroU32::new(cap)?)))
                .collect(),
        }
    }
}

/// Which waiting runs (oldest first) may go to the broker now, given those already out there.
///
/// A run waits while another run of its isolation is out (the old one's process tree may still
/// be writing there), while a deploy of its repository is out (deploys never overlap), or while
/// a cap is full. Runs that may go take their place in the counts for the ones behind them.
pub fn dispatch(waiting: &[ActiveRun], out: &[ActiveRun], caps: &Caps) -> Vec<RunId> {
    let mut total = out.len() as u32;
    let mut per_repository: HashMap<&RepoName, u32> = HashMap::new();
    let mut busy_isolations: HashSet<&IsolationName> = HashSet::new();
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
        if caps.global.is_some_and(|cap| total >= cap.get()) {
            break;
        }
        let repository_count = per_repository.get(&run.repository).copied().unwrap_or(0);
        if caps
            .per_repository
            .get(&run.repository)
            .is_some_and(|cap| repository_count >= cap.get())
        {
            continue;
        }
        if run
            .isolation
            .as_ref()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::fixtures::{ci, config};
    use crate::rules::{RunRequest, validate_request};

    fn active(kind: RunKind, pr: Option<u64>, sha: char, status: RunStatus) -> ActiveRun {
        let repository = RepoName::parse("shop").unwrap();
        ActiveRun {
            id: RunId::new(),
            isolation: pr.map(|pr| IsolationName::for_pr(&repository, PrNumber(pr))),
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
        let global = Caps::from_configured(2, []);
        assert_eq!(
            dispatch(&waiting, std::slice::from_ref(&building), &global),
            vec![pr8.id]
        );
        let per_repository = Caps::from_configured(0, [(RepoName::parse("shop").unwrap(), 1)]);
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
}
