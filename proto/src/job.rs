//! The job message (`Job`, as it travels) and its checked view (`CheckedJob`, what an agent
//! builds): `Job::check` turns the one into the other once, refusing a job whose kind lacks
//! what it needs or names an isolation that is not its own PR's.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, IsolationName, PrNumber, RepoName, RunId, Sha};

/// What a run does. Every kind but `Publish` is built by an agent from a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// `dbt build --select state:modified+ --defer --state <prod>` into the PR's isolation.
    Ci,
    /// `dbt build` of the production branch into production.
    Deploy,
    /// `dbt run-operation` dropping a closed PR's isolation (schema or database).
    Teardown,
    /// A production `manifest.json` made outside slimci (`slimci state publish`): recorded
    /// finished, never built, so no job ever carries this kind.
    Publish,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Ci => "ci",
            RunKind::Deploy => "deploy",
            RunKind::Teardown => "teardown",
            RunKind::Publish => "publish",
        }
    }

    pub fn parse(text: &str) -> Option<RunKind> {
        match text {
            "ci" => Some(RunKind::Ci),
            "deploy" => Some(RunKind::Deploy),
            "teardown" => Some(RunKind::Teardown),
            "publish" => Some(RunKind::Publish),
            _ => None,
        }
    }
}

/// The production state a CI run compares against: the manifest of a successful deploy run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductionStateRef {
    /// The deploy run whose `manifest.json` this is.
    pub deploy_run_id: RunId,
    /// The commit that deploy built.
    pub sha: Sha,
    /// Where the agent downloads the manifest (the coordinator's content-addressed store).
    pub manifest_url: String,
    /// Hex sha256 of the manifest bytes; the agent refuses a download that does not match.
    pub manifest_sha256: String,
}

/// Where a repository's production lives and where its PR schemas go, for agents whose
/// warehouse is a server (PostgreSQL, Snowflake). The repository's, set on the coordinator and
/// carried by each job, so every agent builds a repository the same way. DuckDB agents, whose
/// databases are files per PR, do not use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryWarehouse {
    /// Production's database (PostgreSQL: the one database everything is in).
    pub database: String,
    /// Production's schema: the `schema` of the deploy's profile.
    pub schema: String,
    /// The database PR schemas are created in; none means production's database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_database: Option<String>,
    /// Snowflake's role and warehouse for this repository's builds, instead of the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warehouse: Option<String>,
}

impl RepositoryWarehouse {
    /// The database PR schemas are created in.
    pub fn ci_database(&self) -> &str {
        self.ci_database.as_deref().unwrap_or(&self.database)
    }
}

/// Which commit to build. CI runs name the exact SHA; a deploy may name a branch that the
/// agent resolves at checkout time (and reports back in [`EventBody::Started`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitTarget {
    /// The exact commit, when the requester knows it.
    pub sha: Option<Sha>,
    /// The ref to fetch when the SHA is not yet in the agent's cache, e.g. `refs/pull/7/head`
    /// or `refs/heads/main`. For a deploy without a SHA, the commit this ref points at is built.
    pub fetch_ref: String,
}

/// A job for an agent: one attempt of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub run_id: RunId,
    pub attempt: Attempt,
    pub kind: RunKind,
    pub repository: RepoName,
    /// A URL or path git can fetch from. Never contains credentials; the agent adds its own.
    pub clone_url: String,
    /// The dbt project's directory inside the repository ("" for the root).
    pub project_dir: String,
    pub git: GitTarget,
    /// Set for CI and teardown runs.
    pub pr_number: Option<PrNumber>,
    /// The PR's schema or database name; set for CI and teardown runs. An agent refuses a
    /// job whose isolation is not `IsolationName::for_pr(repository, pr_number)`.
    pub isolation: Option<IsolationName>,
    /// Set for CI runs: what `--state` points at.
    pub production_state: Option<ProductionStateRef>,
    /// Wall-clock limit for the whole attempt.
    pub timeout_secs: u64,
    /// The repository's production and CI locations on a server warehouse, if it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warehouse: Option<RepositoryWarehouse>,
}

/// Why a job is refused before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("a {kind} job needs a PR number and its isolation name")]
    MissingIsolation { kind: &'static str },
    #[error(
        "refusing `{name}`: it is not the PR isolation of {repository} PR #{pr} (expected `{expected}`)"
    )]
    ForeignIsolation {
        name: String,
        repository: String,
        pr: PrNumber,
        expected: String,
    },
    #[error("a {kind} job needs the production state it compares against")]
    MissingProductionState { kind: &'static str },
    #[error("a publish run is never built; no job may carry it")]
    NotBuilt,
}

/// A job whose kind-specific fields were checked once, by `Job::check`: what an agent builds.
/// The wire keeps `Job` (protocol 1), whose optional fields this view turns into each kind's
/// own data.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedJob {
    pub run_id: RunId,
    pub attempt: Attempt,
    pub repository: RepoName,
    /// A URL or path git can fetch from. Never contains credentials; the agent adds its own.
    pub clone_url: String,
    /// The dbt project's directory inside the repository ("" for the root).
    pub project_dir: String,
    pub git: GitTarget,
    /// Wall-clock limit for the whole attempt.
    pub timeout: Duration,
    pub kind: JobKind,
    /// The repository's production and CI locations on a server warehouse, if it has them.
    pub warehouse: Option<RepositoryWarehouse>,
}

/// What a checked job builds, with the data only that kind has.
#[derive(Debug, Clone, PartialEq)]
pub enum JobKind {
    /// A PR build into `isolation`, compared against `production_state`.
    Ci {
        pr: PrNumber,
        isolation: IsolationName,
        production_state: ProductionStateRef,
    },
    /// A build of the production branch into production.
    Deploy,
    /// The drop of a closed PR's `isolation`.
    Teardown {
        pr: PrNumber,
        isolation: IsolationName,
    },
}

impl JobKind {
    pub fn run_kind(&self) -> RunKind {
        match self {
            JobKind::Ci { .. } => RunKind::Ci,
            JobKind::Deploy => RunKind::Deploy,
            JobKind::Teardown { .. } => RunKind::Teardown,
        }
    }
}

impl CheckedJob {
    pub fn run_kind(&self) -> RunKind {
        self.kind.run_kind()
    }
}

impl Job {
    /// The checks an agent makes before it claims a job: a CI or teardown job must name the
    /// isolation of its own repository and PR, so no job can point a build, and above all a
    /// drop, at anything else; a CI job must name the production state it compares against.
    pub fn check(self) -> Result<CheckedJob, JobError> {
        let kind = match self.kind {
            RunKind::Publish => return Err(JobError::NotBuilt),
            RunKind::Deploy => JobKind::Deploy,
            RunKind::Ci | RunKind::Teardown => {
                let (Some(pr), Some(isolation)) = (self.pr_number, self.isolation) else {
                    return Err(JobError::MissingIsolation {
                        kind: self.kind.as_str(),
                    });
                };
                let expected = IsolationName::for_pr(&self.repository, pr);
                if expected != isolation {
                    return Err(JobError::ForeignIsolation {
                        name: isolation.to_string(),
                        repository: self.repository.to_string(),
                        pr,
                        expected: expected.to_string(),
                    });
                }
                match (self.kind, self.production_state) {
                    (RunKind::Teardown, _) => JobKind::Teardown { pr, isolation },
                    (_, Some(production_state)) => JobKind::Ci {
                        pr,
                        isolation,
                        production_state,
                    },
                    (_, None) => return Err(JobError::MissingProductionState { kind: "ci" }),
                }
            }
        };
        Ok(CheckedJob {
            run_id: self.run_id,
            attempt: self.attempt,
            repository: self.repository,
            clone_url: self.clone_url,
            project_dir: self.project_dir,
            git: self.git,
            timeout: Duration::from_secs(self.timeout_secs),
            kind,
            warehouse: self.warehouse,
        })
    }
}

impl From<CheckedJob> for Job {
    /// The wire form of a checked job (what `Job::check` accepts back unchanged).
    fn from(checked: CheckedJob) -> Job {
        let kind = checked.run_kind();
        let (pr_number, isolation, production_state) = match checked.kind {
            JobKind::Ci {
                pr,
                isolation,
                production_state,
            } => (Some(pr), Some(isolation), Some(production_state)),
            JobKind::Deploy => (None, None, None),
            JobKind::Teardown { pr, isolation } => (Some(pr), Some(isolation), None),
        };
        Job {
            run_id: checked.run_id,
            attempt: checked.attempt,
            kind,
            repository: checked.repository,
            clone_url: checked.clone_url,
            project_dir: checked.project_dir,
            git: checked.git,
            pr_number,
            isolation,
            production_state,
            timeout_secs: checked.timeout.as_secs(),
            warehouse: checked.warehouse,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_job() -> Job {
        Job {
            run_id: RunId::new(),
            attempt: Attempt(1),
            kind: RunKind::Ci,
            repository: RepoName::parse("shop").unwrap(),
            clone_url: "/srv/git/shop.git".into(),
            project_dir: String::new(),
            git: GitTarget {
                sha: Some(Sha::parse("0123456789abcdef0123456789abcdef01234567").unwrap()),
                fetch_ref: "refs/pull/7/head".into(),
            },
            pr_number: Some(PrNumber(7)),
            isolation: Some(IsolationName::for_pr(
                &RepoName::parse("shop").unwrap(),
                PrNumber(7),
            )),
            production_state: None,
            timeout_secs: 3600,
            warehouse: None,
        }
    }

    fn sample_state() -> ProductionStateRef {
        ProductionStateRef {
            deploy_run_id: RunId::new(),
            sha: Sha::parse(&"a".repeat(40)).unwrap(),
            manifest_url: "http://c/m".into(),
            manifest_sha256: "b".repeat(64),
        }
    }

    #[test]
    fn a_job_must_name_its_own_isolation() {
        let mut job = sample_job();
        job.production_state = Some(sample_state());
        assert!(job.clone().check().is_ok());
        let mut foreign = job.clone();
        foreign.kind = RunKind::Teardown;
        foreign.isolation = Some(IsolationName::for_pr(
            &RepoName::parse("other").unwrap(),
            PrNumber(7),
        ));
        let error = foreign.check().unwrap_err().to_string();
        assert!(error.contains("refusing `pr_other_7`"), "{error}");
        let mut other_pr = job.clone();
        other_pr.pr_number = Some(PrNumber(8));
        assert!(other_pr.check().is_err());
        let mut missing = job;
        missing.isolation = None;
        assert_eq!(
            missing.check(),
            Err(JobError::MissingIsolation { kind: "ci" })
        );
    }

    #[test]
    fn a_ci_job_needs_its_production_state() {
        assert_eq!(
            sample_job().check(),
            Err(JobError::MissingProductionState { kind: "ci" })
        );
    }

    #[test]
    fn each_kind_checks_into_its_own_data() {
        let state = sample_state();
        let mut ci = sample_job();
        ci.production_state = Some(state.clone());
        let checked = ci.check().unwrap();
        assert_eq!(checked.timeout, Duration::from_secs(3600));
        assert_eq!(
            checked.kind,
            JobKind::Ci {
                pr: PrNumber(7),
                isolation: IsolationName::for_pr(&checked.repository, PrNumber(7)),
                production_state: state,
            }
        );

        let mut teardown = sample_job();
        teardown.kind = RunKind::Teardown;
        let checked = teardown.check().unwrap();
        assert_eq!(checked.run_kind(), RunKind::Teardown);
        assert!(matches!(
            checked.kind,
            JobKind::Teardown {
                pr: PrNumber(7),
                ..
            }
        ));

        // A deploy needs neither a PR nor a state, and ignores them.
        let mut deploy = sample_job();
        deploy.kind = RunKind::Deploy;
        deploy.pr_number = None;
        deploy.isolation = None;
        assert_eq!(deploy.check().unwrap().kind, JobKind::Deploy);

        // A published manifest is a run, never a job.
        let mut publish = sample_job();
        publish.kind = RunKind::Publish;
        assert_eq!(publish.check(), Err(JobError::NotBuilt));
        assert_eq!(RunKind::parse("publish"), Some(RunKind::Publish));
    }

    #[test]
    fn a_checked_job_goes_back_to_the_same_wire_job() {
        let mut ci = sample_job();
        ci.production_state = Some(sample_state());
        let mut teardown = sample_job();
        teardown.kind = RunKind::Teardown;
        let mut deploy = sample_job();
        deploy.kind = RunKind::Deploy;
        deploy.pr_number = None;
        deploy.isolation = None;
        for job in [ci, teardown, deploy] {
            assert_eq!(Job::from(job.clone().check().unwrap()), job);
        }
    }
}
