//! slimci beside dbt Cloud (README "Hybrid with dbt Cloud"): the production state of a
//! repository with `production_source = "dbt_cloud"` is the `manifest.json` of its production
//! job's latest successful run, imported as a publish run that names the Cloud run; and with
//! `routing`, dbt Cloud's CI job and slimci's fleet are each other's overflow capacity.
//!
//! - `config`: `[repository.dbt_cloud]` and `production_source`.
//! - `client`: the Administrative API v2 (envelopes, paging, retries).
//! - `production`: the import, polled and on demand.
//! - `overflow`: the router (fleet or dbt Cloud, `rules::route`) and the loop driving Cloud runs.
//! - `mirror`: one Cloud run followed as if the coordinator were its agent.

pub mod client;
pub mod config;
mod mirror;
mod overflow;
pub mod production;

use std::collections::HashMap;
use std::sync::Arc;

use slimci_proto::RepoName;

pub use client::{CloudClient, CloudError, CloudRun, CloudStatus};
pub use config::Routing;
pub use overflow::{awaits_routing, overflow_loop};
pub use production::{Refreshed, production_loop, refresh_if_stale, refresh_production};

use crate::config::{Config, ConfigError};

/// Each repository that has a `[repository.dbt_cloud]` section, with its client.
#[derive(Default)]
pub struct DbtCloud {
    repositories: HashMap<RepoName, Arc<CloudRepository>>,
}

pub struct CloudRepository {
    pub config: config::DbtCloudConfig,
    pub client: CloudClient,
    /// One production import at a time per repository, so none is imported twice.
    refreshing: tokio::sync::Mutex<()>,
    /// When dbt Cloud was last asked for the production job's latest success.
    checked: std::sync::Mutex<Option<std::time::Instant>>,
    /// Asks the poller to look now (a stale production state at a dispatch).
    wake: tokio::sync::Notify,
}

impl DbtCloud {
    /// Reads every section's token; a missing token file stops the coordinator at start.
    pub fn from_config(config: &Config) -> Result<DbtCloud, ConfigError> {
        let mut repositories = HashMap::new();
        for repository in &config.repositories {
            let Some(section) = &repository.dbt_cloud else {
                continue;
            };
            let token = section.read_token().map_err(|error| {
                ConfigError::Invalid(format!("repository `{}`: {error}", repository.name))
            })?;
            repositories.insert(
                repository.name.clone(),
                Arc::new(CloudRepository {
                    config: section.clone(),
                    client: CloudClient::new(section, token),
                    refreshing: tokio::sync::Mutex::new(()),
                    checked: std::sync::Mutex::new(None),
                    wake: tokio::sync::Notify::new(),
                }),
            );
        }
        Ok(DbtCloud { repositories })
    }

    pub fn repository(&self, name: &RepoName) -> Option<&Arc<CloudRepository>> {
        self.repositories.get(name)
    }

    /// Whether any repository routes CI runs between the fleet and dbt Cloud.
    pub fn routes_any(&self) -> bool {
        self.repositories
            .values()
            .any(|repository| repository.config.routing.is_some())
    }
}
