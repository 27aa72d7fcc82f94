//! `[repository.dbt_cloud]`: where a repository's dbt Cloud account is and which of its jobs
//! slimci uses, and `production_source`, which says where the repository's production state
//! comes from.

use std::path::PathBuf;

use serde::Deserialize;

pub use crate::rules::Routing;

/// Where a repository's production state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductionSource {
    /// slimci's own deploys, or manifests published to it (`slimci state publish`).
    #[default]
    Slimci,
    /// The `manifest.json` of the latest successful run of the dbt Cloud production job.
    DbtCloud,
}

/// The multi-tenant North American host; other regions and single-tenant accounts have their
/// own (`emea.dbt.com`, `au.dbt.com`, `<prefix>.us1.dbt.com`, ...).
pub const DEFAULT_API_URL: &str = "https://cloud.getdbt.com";

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbtCloudConfig {
    pub account_id: u64,
    /// The account's access URL, without `/api/v2`.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// A service token with job admin (trigger, cancel) and read access; or `token_file`.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// The job whose successful runs are production (with `production_source = "dbt_cloud"`);
    /// or `production_environment_id`: any job's successful run in that environment.
    pub production_job_id: Option<u64>,
    pub production_environment_id: Option<u64>,
    /// How often the production job's latest successful run is looked for.
    #[serde(default = "default_poll_secs")]
    pub production_poll_secs: u64,
    /// Before dispatching a CI run, a production state older than this is looked for again
    /// (at most that once per dispatch).
    #[serde(default = "default_max_age_secs")]
    pub production_max_age_secs: u64,
    /// The CI job slimci triggers for a pull request's run routed to dbt Cloud (with `routing`).
    pub ci_job_id: Option<u64>,
    /// Which backend CI runs try first; none: the fleet builds every run.
    pub routing: Option<Routing>,
    /// dbt Cloud is full when the account has this many runs queued, starting or running
    /// (counted across every page); together with the account's `run_slots` when it reports
    /// them, the smaller wins. On plans where CI runs take no run slot, this is the limit.
    pub max_in_flight: Option<u32>,
    /// dbt Cloud is also full when a run of the account has been queued there longer than this.
    #[serde(default = "default_cloud_queue_secs")]
    pub max_cloud_queue_secs: u64,
    /// `fleet_first`: a run goes to dbt Cloud once it has waited this long while every fleet
    /// slot was busy.
    #[serde(default = "default_fleet_wait_secs")]
    pub fleet_wait_secs: u64,
    /// How often each run slimci has in dbt Cloud is looked at (status, step logs).
    #[serde(default = "default_cloud_poll_secs")]
    pub run_poll_secs: u64,
}

impl std::fmt::Debug for DbtCloudConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbtCloudConfig")
            .field("account_id", &self.account_id)
            .field("api_url", &self.api_url)
            .field("token", &self.token.as_ref().map(|_| "<masked>"))
            .field("token_file", &self.token_file)
            .field("production_job_id", &self.production_job_id)
            .field("production_environment_id", &self.production_environment_id)
            .field("production_poll_secs", &self.production_poll_secs)
            .field("production_max_age_secs", &self.production_max_age_secs)
            .field("ci_job_id", &self.ci_job_id)
            .field("routing", &self.routing)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_cloud_queue_secs", &self.max_cloud_queue_secs)
            .field("fleet_wait_secs", &self.fleet_wait_secs)
            .field("run_poll_secs", &self.run_poll_secs)
            .finish()
    }
}

fn default_api_url() -> String {
    DEFAULT_API_URL.to_owned()
}

fn default_poll_secs() -> u64 {
    60
}

fn default_max_age_secs() -> u64 {
    600
}

fn default_cloud_queue_secs() -> u64 {
    120
}

fn default_fleet_wait_secs() -> u64 {
    120
}

fn default_cloud_poll_secs() -> u64 {
    5
}

impl DbtCloudConfig {
    /// What is wrong with this section of repository `repository`, whose production comes from
    /// `source` and which slimci deploys if `deploys`.
    pub fn check(
        section: Option<&DbtCloudConfig>,
        repository: &str,
        source: ProductionSource,
        deploys: bool,
    ) -> Result<(), String> {
        if source == ProductionSource::DbtCloud {
            let Some(section) = section else {
                return Err(format!(
                    "repository `{repository}`: production_source = \"dbt_cloud\" needs a [repository.dbt_cloud] section with account_id, token_file and production_job_id"
                ));
            };
            if section.production_job_id.is_some() == section.production_environment_id.is_some() {
                return Err(format!(
                    "repository `{repository}`: production_source = \"dbt_cloud\" needs exactly one of dbt_cloud.production_job_id (the job whose successful runs are production) and dbt_cloud.production_environment_id (any job's successful run in that environment)"
                ));
            }
            if deploys {
                return Err(format!(
                    "repository `{repository}`: production comes from dbt Cloud, so slimci must not deploy it too: set deploys = false"
                ));
            }
        }
        let Some(section) = section else {
            return Ok(());
        };
        if section.token.is_some() == section.token_file.is_some() {
            return Err(format!(
                "repository `{repository}`: dbt_cloud needs exactly one of token and token_file"
            ));
        }
        let url = section.api_url.trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.ends_with("/api/v2")
        {
            return Err(format!(
                "repository `{repository}`: dbt_cloud.api_url `{}` must be the account's access URL, such as {DEFAULT_API_URL}, without /api/v2",
                section.api_url
            ));
        }
        if section.routing.is_some() && section.ci_job_id.is_none() {
            return Err(format!(
                "repository `{repository}`: dbt_cloud.routing needs dbt_cloud.ci_job_id, the CI job slimci triggers"
            ));
        }
        if section.ci_job_id.is_some() && section.ci_job_id == section.production_job_id {
            return Err(format!(
                "repository `{repository}`: dbt_cloud.ci_job_id and dbt_cloud.production_job_id are both {}: pull request builds would become production",
                section.ci_job_id.unwrap_or_default()
            ));
        }
        if section.run_poll_secs == 0 {
            return Err(format!(
                "repository `{repository}`: dbt_cloud.run_poll_secs must be at least 1"
            ));
        }
        if section.production_poll_secs == 0 {
            return Err(format!(
                "repository `{repository}`: dbt_cloud.production_poll_secs must be at least 1"
            ));
        }
        Ok(())
    }

    /// The token, from the config or its file.
    pub fn read_token(&self) -> Result<String, String> {
        match (&self.token, &self.token_file) {
            (Some(token), _) => Ok(token.trim().to_owned()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|text| text.trim().to_owned())
                .map_err(|error| {
                    format!(
                        "cannot read dbt_cloud.token_file {}: {error}",
                        path.display()
                    )
                }),
            (None, None) => Err("dbt_cloud needs token or token_file".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(extra: &str) -> DbtCloudConfig {
        toml::from_str(&format!("account_id = 1\n{extra}")).unwrap()
    }

    #[test]
    fn a_wrong_dbt_cloud_setup_is_refused_saying_what_to_set() {
        let cloud = ProductionSource::DbtCloud;
        let complete = section("token = \"t\"\nproduction_job_id = 4");
        assert_eq!(
            DbtCloudConfig::check(Some(&complete), "shop", cloud, false),
            Ok(())
        );
        let refusals = [
            (None, false, "needs a [repository.dbt_cloud] section"),
            (
                Some(section("token = \"t\"")),
                false,
                "needs exactly one of dbt_cloud.production_job_id",
            ),
            (Some(complete.clone()), true, "set deploys = false"),
            (
                Some(section("production_job_id = 4")),
                false,
                "exactly one of token and token_file",
            ),
            (
                Some(section(
                    "token = \"t\"\nproduction_job_id = 4\nrouting = \"cloud_first\"",
                )),
                false,
                "routing needs dbt_cloud.ci_job_id",
            ),
            (
                Some(section(
                    "token = \"t\"\nproduction_job_id = 4\napi_url = \"https://cloud.getdbt.com/api/v2\"",
                )),
                false,
                "without /api/v2",
            ),
            (
                Some(section(
                    "token = \"t\"\nproduction_job_id = 4\nci_job_id = 4",
                )),
                false,
                "pull request builds would become production",
            ),
        ];
        for (given, deploys, expected) in refusals {
            let refused =
                DbtCloudConfig::check(given.as_ref(), "shop", cloud, deploys).expect_err(expected);
            assert!(refused.contains(expected), "{refused}");
            assert!(refused.starts_with("repository `shop`"), "{refused}");
        }
        // Without dbt Cloud as the source, no section is needed.
        assert_eq!(
            DbtCloudConfig::check(None, "shop", ProductionSource::Slimci, true),
            Ok(())
        );
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let shown = format!("{:?}", section("token = \"secret-token\""));
        assert!(!shown.contains("secret-token"), "{shown}");
    }
}
