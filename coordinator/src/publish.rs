//! Making a `manifest.json` made outside slimci the production state of a repository: stored
//! as the artifact of a new `publish` run, checked to be a dbt manifest, then recorded with the
//! run, finished, in one transaction. The API's publish and the dbt Cloud production import
//! both come through here; a refused manifest leaves nothing behind.

use std::io::BufReader;
use std::time::SystemTime;

use futures::Stream;
use opentelemetry::KeyValue;
use slimci_proto::{RunId, Sha};
use slimci_telemetry::semconv;

use crate::app::AppState;
use crate::artifacts::ArtifactError;
use crate::config::RepositoryConfig;
use crate::rules::{self, ManifestFacts};
use crate::store::{ArtifactRecord, ProductionState, Publish, StoreError, now_ms};
use crate::telemetry::publish::PublishTrace;

/// The artifact name a production state's manifest has, whichever run made it.
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "the manifest is larger than the limit of {limit} bytes (the coordinator's `limits.max_artifact_bytes`)"
    )]
    TooLarge { limit: u64 },
    /// The body could not be read, or is not a dbt manifest.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a published manifest comes from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// `POST /api/v1/repositories/{name}/production-state` (`slimci state publish`), by whom.
    Api(slimci_client::Trigger),
    /// The run of a dbt Cloud job.
    DbtCloud { run: u64, job: Option<u64> },
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::Api(_) => rules::FROM_OUTSIDE.to_owned(),
            Origin::DbtCloud {
                run,
                job: Some(job),
            } => {
                format!("of dbt Cloud run {run} (production job {job})")
            }
            Origin::DbtCloud { run, job: None } => format!("of dbt Cloud run {run} (production)"),
        }
    }

    fn dbt_cloud_run(&self) -> Option<u64> {
        match self {
            Origin::Api(_) => None,
            Origin::DbtCloud { run, .. } => Some(*run),
        }
    }

    fn trigger(&self) -> slimci_client::Trigger {
        match self {
            Origin::Api(trigger) => trigger.clone(),
            Origin::DbtCloud { run, job } => slimci_client::Trigger::DbtCloud {
                job: *job,
                run: *run,
            },
        }
    }
}

/// Stores `body` as the manifest of a new publish run of `repository` at `sha`, checks it, and
/// makes it the production state. Each step is a span of the publish's trace when traces are
/// exported (`telemetry::publish`).
pub async fn publish_manifest<S, E>(
    state: &AppState,
    repository: &RepositoryConfig,
    sha: Sha,
    body: S,
    origin: Origin,
) -> Result<ProductionState, PublishError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let id = RunId::new();
    let fetch_ref = format!("refs/heads/{}", repository.production_branch);
    let trace = PublishTrace::start(state, id, &repository.name, &sha, &fetch_ref);
    let step = |name: &str, start: SystemTime, facts: Vec<KeyValue>, error: Option<String>| {
        if let Some(trace) = &trace {
            trace.step(name, start, facts, error);
        }
    };
    let limit = state.config.limits.max_artifact_bytes;
    let recorded = async {
        let receiving = SystemTime::now();
        let stored = state
            .artifacts
            .put(id, MANIFEST, body, limit)
            .await
            .map_err(|error| match error {
                ArtifactError::TooLarge { limit } => PublishError::TooLarge { limit },
                ArtifactError::Body(_) => PublishError::Refused(error.to_string()),
                ArtifactError::BadName(_) | ArtifactError::Io(_) => {
                    PublishError::Internal(error.to_string())
                }
            });
        let facts = match &stored {
            Ok(stored) => vec![
                KeyValue::new(semconv::SLIMCI_MANIFEST_BYTES, stored.size as i64),
                KeyValue::new(semconv::SLIMCI_MANIFEST_SHA256, stored.sha256.clone()),
            ],
            Err(_) => Vec::new(),
        };
        step("receive manifest", receiving, facts, error_of(&stored));
        let stored = stored?;
        let checking = SystemTime::now();
        let facts = check_stored_manifest(state, id).await;
        let found = match &facts {
            Ok(facts) => vec![KeyValue::new(
                semconv::SLIMCI_MANIFEST_NODES,
                facts.nodes as i64,
            )],
            Err(_) => Vec::new(),
        };
        step("check manifest", checking, found, error_of(&facts));
        let facts = facts?;
        let publish = Publish {
            id,
            repository: repository.name.clone(),
            sha,
            fetch_ref,
            message: rules::published_message(&facts, stored.size, &origin.describe()),
            manifest: ArtifactRecord {
                name: MANIFEST.to_owned(),
                size: stored.size,
                sha256: stored.sha256,
                created_ms: now_ms(),
            },
            trigger: origin.trigger(),
            dbt_cloud_run_id: origin.dbt_cloud_run(),
            traceparent: trace.as_ref().map(PublishTrace::traceparent),
        };
        let recording = SystemTime::now();
        let production = state
            .store
            .record_publish(&publish)
            .await
            .map_err(PublishError::from);
        step(
            "record production state",
            recording,
            Vec::new(),
            error_of(&production),
        );
        production
    }
    .await;
    if let Some(trace) = trace {
        trace.end(error_of(&recorded));
    }
    match recorded {
        Ok(production) => {
            tracing::info!(run = %id, repository = %production.repository, sha = %production.sha, manifest_sha256 = %production.manifest_sha256, ?origin, "manifest published; it is the production state now");
            let _ = state.changes.send(id);
            Ok(production)
        }
        Err(error) => {
            if let Err(removing) = state.artifacts.remove_run(id).await {
                tracing::warn!(run = %id, error = %removing, "cannot remove a refused publish's manifest");
            }
            Err(error)
        }
    }
}

/// What a step's span says of its failure: the message the publisher gets.
fn error_of<T>(result: &Result<T, PublishError>) -> Option<String> {
    result.as_ref().err().map(ToString::to_string)
}

async fn check_stored_manifest(state: &AppState, id: RunId) -> Result<ManifestFacts, PublishError> {
    let path = state
        .artifacts
        .path(id, MANIFEST)
        .map_err(|error| PublishError::Internal(error.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)
            .map_err(|error| PublishError::Internal(format!("{}: {error}", path.display())))?;
        rules::check_manifest(BufReader::new(file))
            .map_err(|error| PublishError::Refused(error.to_string()))
    })
    .await
    .map_err(|error| PublishError::Internal(error.to_string()))?
}
