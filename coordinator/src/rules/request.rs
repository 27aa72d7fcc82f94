//! Requests for runs: validating a `RunRequest` against the configuration (a repository may
//! have deploys off), the teardown request for a closed PR, and admission (a CI run needs
//! production state, and the advice for one that has none).

use slimci_proto::{IsolationName, PrNumber, RepoName, RunKind, Sha};

use crate::config::{Config, RepositoryConfig};

/// `POST /api/v1/runs` as it arrives, before validation: the user API's own type.
pub use slimci_client::RunRequest;

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
    #[error(
        "a manifest is published with POST /api/v1/repositories/{{name}}/production-state?sha=<commit> (`slimci state publish`)"
    )]
    PublishViaRuns,
    #[error(
        "deploys are off for repository `{0}` (`deploys = false` in the coordinator's configuration): its production state comes from the production job that runs elsewhere, published with `slimci state publish --repo {0} --sha <commit> target/manifest.json`"
    )]
    DeploysOff(RepoName),
}

impl RequestError {
    /// A well-formed request the repository's configuration does not allow (HTTP 409), as
    /// against a malformed one (400).
    pub fn is_conflict(&self) -> bool {
        matches!(self, RequestError::DeploysOff(_))
    }
}

/// Whether slimci may deploy `repository`: refused when its production state comes from
/// publishes only.
pub fn check_deploys_allowed(repository: &RepositoryConfig) -> Result<(), RequestError> {
    if repository.deploys {
        Ok(())
    } else {
        Err(RequestError::DeploysOff(repository.name.clone()))
    }
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
        RunKind::Publish => Err(RequestError::PublishViaRuns),
        RunKind::Deploy => {
            check_deploys_allowed(repository)?;
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
pub fn admit(
    request: &ValidRequest,
    repository: &RepositoryConfig,
    has_production_state: bool,
) -> Admission {
    if request.kind == RunKind::Ci && !has_production_state {
        return Admission::Refuse(no_production_state_message(repository));
    }
    Admission::Queue
}

/// What to tell someone who needs a repository's production state before there is any: the
/// two ways to make it (a slimci deploy, or publishing the manifest of a production run made
/// elsewhere), or only the second when deploys are off.
pub fn no_production_state_message(repository: &RepositoryConfig) -> String {
    let name = &repository.name;
    let publish = format!("slimci state publish --repo {name} --sha <commit> target/manifest.json");
    if repository.deploys {
        format!(
            "repository `{name}` has no production state yet: a CI run compares against production's manifest.json. Deploy with `slimci deploy --repo {name}` first, or, if production runs elsewhere (cron, Airflow, dbt Cloud), publish that run's manifest with `{publish}`."
        )
    } else {
        format!(
            "repository `{name}` has no production state yet: a CI run compares against production's manifest.json, and deploys are off for this repository, so publish the manifest of the production run made elsewhere with `{publish}`."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::fixtures::{SHA, ci, config};

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
        let config = config();
        let repository = &config.repositories[0];
        let valid = validate_request(&config, &ci(Some(7), Some(SHA))).unwrap();
        match admit(&valid, repository, false) {
            Admission::Refuse(message) => {
                assert!(message.contains("slimci deploy --repo shop"), "{message}");
                assert!(
                    message.contains("slimci state publish --repo shop --sha <commit>"),
                    "{message}"
                );
            }
            Admission::Queue => panic!("queued a CI run without production state"),
        }
        assert_eq!(admit(&valid, repository, true), Admission::Queue);
        let deploy = ValidRequest {
            kind: RunKind::Deploy,
            ..valid
        };
        assert_eq!(admit(&deploy, repository, false), Admission::Queue);
    }

    #[test]
    fn with_deploys_off_a_deploy_is_refused_and_the_advice_names_only_publishing() {
        let mut config = config();
        config.repositories[0].deploys = false;
        let deploy = RunRequest {
            repository: "shop".into(),
            kind: Some("deploy".into()),
            ..Default::default()
        };
        let refused = validate_request(&config, &deploy).unwrap_err();
        assert!(refused.is_conflict());
        let message = refused.to_string();
        assert!(
            message.contains("deploys are off for repository `shop`"),
            "{message}"
        );
        assert!(
            message.contains("slimci state publish --repo shop"),
            "{message}"
        );
        let advice = no_production_state_message(&config.repositories[0]);
        assert!(
            advice.contains("slimci state publish --repo shop"),
            "{advice}"
        );
        assert!(!advice.contains("slimci deploy"), "{advice}");
        // CI runs are requested as before.
        assert!(validate_request(&config, &ci(Some(7), Some(SHA))).is_ok());
        let publish = RunRequest {
            kind: Some("publish".into()),
            ..deploy
        };
        assert_eq!(
            validate_request(&config, &publish),
            Err(RequestError::PublishViaRuns)
        );
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
}
