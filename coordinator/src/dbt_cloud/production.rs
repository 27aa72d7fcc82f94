//! Production state from dbt Cloud: the `manifest.json` of the production job's latest
//! successful run becomes the repository's production state, as a publish run that names the
//! Cloud run. A poller looks every `production_poll_secs`; a CI run submitted while the last
//! look is older than `production_max_age_secs` looks first. Only a run newer than the last
//! one imported is taken, so a failed or older run never moves production back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use slimci_proto::Sha;
use tokio_util::sync::CancellationToken;

use super::CloudRepository;
use super::client::{CloudError, Production};
use super::config::ProductionSource;
use crate::app::AppState;
use crate::config::RepositoryConfig;
use crate::publish::{MANIFEST, Origin, PublishError, publish_manifest};
use crate::store::{ProductionState, StoreError};

/// How long a submission waits for dbt Cloud before it goes on with the production state it has.
const ON_DEMAND_WAIT: Duration = Duration::from_secs(30);

/// What a look at the production job found.
#[derive(Debug)]
pub enum Refreshed {
    /// Its latest success is the one imported last (its id), or older.
    Unchanged(u64),
    /// A newer success, now the production state.
    Imported(ProductionState),
    /// The job has no successful run yet.
    NoSuccessfulRun,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error(
        "dbt Cloud run {run} of the production job has no git_sha to compare a pull request against"
    )]
    NoSha { run: u64 },
    #[error("the manifest of dbt Cloud run {run} was refused: {source}")]
    Publish { run: u64, source: PublishError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Looks at the production job's latest successful run and imports its manifest if it is newer
/// than the last one imported.
pub async fn refresh_production(
    state: &AppState,
    repository: &RepositoryConfig,
    cloud: &CloudRepository,
) -> Result<Refreshed, ImportError> {
    let production = match (
        cloud.config.production_job_id,
        cloud.config.production_environment_id,
    ) {
        (Some(job), _) => Production::Job(job),
        (None, Some(environment)) => Production::Environment(environment),
        (None, None) => {
            unreachable!("checked at start: production_source = dbt_cloud names its production")
        }
    };
    let _one_at_a_time = cloud.refreshing.lock().await;
    let latest = cloud
        .client
        .latest_success(production, cloud.config.ci_job_id)
        .await?;
    *cloud.checked.lock().expect("not poisoned") = Some(Instant::now());
    let Some(latest) = latest else {
        return Ok(Refreshed::NoSuccessfulRun);
    };
    if let Some(known) = state
        .store
        .latest_dbt_cloud_import(&repository.name)
        .await?
        && known >= latest.id
    {
        return Ok(Refreshed::Unchanged(known));
    }
    let sha = latest
        .git_sha
        .as_deref()
        .and_then(|sha| Sha::parse(sha).ok())
        .ok_or(ImportError::NoSha { run: latest.id })?;
    let manifest = cloud.client.artifact(latest.id, MANIFEST).await?;
    let origin = Origin::DbtCloud {
        run: latest.id,
        job: latest.job_definition_id.or(cloud.config.production_job_id),
    };
    let production = publish_manifest(state, repository, sha, manifest, origin)
        .await
        .map_err(|source| ImportError::Publish {
            run: latest.id,
            source,
        })?;
    Ok(Refreshed::Imported(production))
}

/// Before a CI run of `repository` is recorded: if its production comes from dbt Cloud and the
/// last look is older than `production_max_age_secs` (or there was none), looks now, for at
/// most [`ON_DEMAND_WAIT`]. Failures are logged; the run goes on with what there is.
pub async fn refresh_if_stale(state: &AppState, repository: &RepositoryConfig) {
    if repository.production_source != ProductionSource::DbtCloud {
        return;
    }
    let Some(cloud) = state.dbt_cloud.repository(&repository.name) else {
        return;
    };
    let max_age = Duration::from_secs(cloud.config.production_max_age_secs);
    let fresh = cloud
        .checked
        .lock()
        .expect("not poisoned")
        .is_some_and(|checked| checked.elapsed() < max_age);
    if fresh {
        return;
    }
    match tokio::time::timeout(ON_DEMAND_WAIT, refresh_production(state, repository, cloud)).await {
        Ok(Ok(refreshed)) => log_refresh(&repository.name, &refreshed),
        Ok(Err(error)) => {
            tracing::warn!(repository = %repository.name, %error, "cannot look at dbt Cloud's production job; going on with the production state there is");
        }
        Err(_) => {
            tracing::warn!(repository = %repository.name, wait = ?ON_DEMAND_WAIT, "dbt Cloud did not answer in time; going on with the production state there is");
            cloud.wake.notify_one();
        }
    }
}

fn log_refresh(repository: &slimci_proto::RepoName, refreshed: &Refreshed) {
    match refreshed {
        Refreshed::Imported(production) => tracing::info!(
            %repository,
            dbt_cloud_run = production.dbt_cloud_run_id,
            run = %production.deploy_run_id,
            sha = %production.sha,
            "imported the manifest of dbt Cloud's latest successful production run"
        ),
        Refreshed::Unchanged(run) => {
            tracing::debug!(%repository, dbt_cloud_run = run, "dbt Cloud's production is unchanged")
        }
        Refreshed::NoSuccessfulRun => tracing::warn!(
            %repository,
            "dbt Cloud's production job has no successful run yet: pull requests have nothing to compare against"
        ),
    }
}

/// Polls each repository whose production comes from dbt Cloud until shutdown.
pub async fn production_loop(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut pollers = tokio::task::JoinSet::new();
    for repository in &state.config.repositories {
        if repository.production_source != ProductionSource::DbtCloud {
            continue;
        }
        let Some(cloud) = state.dbt_cloud.repository(&repository.name).cloned() else {
            continue;
        };
        let (state, repository, shutdown) = (state.clone(), repository.clone(), shutdown.clone());
        pollers.spawn(async move {
            let every = Duration::from_secs(cloud.config.production_poll_secs);
            loop {
                match refresh_production(&state, &repository, &cloud).await {
                    Ok(refreshed) => log_refresh(&repository.name, &refreshed),
                    Err(error) => {
                        tracing::warn!(repository = %repository.name, %error, retry_in = ?every, "cannot import dbt Cloud's production state")
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                    () = cloud.wake.notified() => {}
                }
            }
        });
    }
    while pollers.join_next().await.is_some() {}
}
