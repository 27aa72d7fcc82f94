//! The coordinator's configuration file (TOML).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use slimci_broker::AmqpConfig;
use slimci_config_file::{ConfigFileError, inline_or_file, load_toml};
use slimci_proto::{IsolationName, PrNumber, RepoName, RepositoryWarehouse};

pub use crate::dbt_cloud::config::{DbtCloudConfig, ProductionSource};

/// Everything `slimci-coordinator` reads at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on; port 0 picks a free one (written to `<data_dir>/http.addr`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL agents and users reach this coordinator at. Defaults to `http://<listen>`.
    pub public_url: Option<String>,
    /// SQLite database, logs and artifacts live here.
    pub data_dir: PathBuf,
    pub amqp: AmqpConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub scheduling: Scheduling,
    /// GitHub webhooks, statuses and PR comments; leave out to use only the HTTP API and CLI.
    pub github: Option<GitHubConfig>,
    #[serde(default)]
    pub sweeper: Sweeper,
    #[serde(default)]
    pub reliability: Reliability,
    #[serde(rename = "repository", default)]
    pub repositories: Vec<RepositoryConfig>,
    /// OpenTelemetry: OTLP export of traces and metrics, and `/metrics` on its own address.
    #[serde(default)]
    pub telemetry: slimci_telemetry::TelemetryConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer token agents present to claim runs and upload artifacts.
    pub agent_token: Option<String>,
    pub agent_token_file: Option<PathBuf>,
    /// Bearer token users and the CLI present. Without one, the user API is open to anyone who
    /// can reach the listen address (bind it to a private interface).
    pub api_token: Option<String>,
    pub api_token_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = |set: bool| if set { "<masked>" } else { "<unset>" };
        f.debug_struct("AuthConfig")
            .field("agent_token", &masked(self.agent_token.is_some()))
            .field("agent_token_file", &self.agent_token_file)
            .field("api_token", &masked(self.api_token.is_some()))
            .field("api_token_file", &self.api_token_file)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock limit of one attempt unless the repository sets its own.
    #[serde(default = "default_timeout_secs")]
    pub run_timeout_secs: u64,
    /// Largest artifact an agent may upload.
    #[serde(default = "default_artifact_bytes")]
    pub max_artifact_bytes: u64,
    /// Stored log per attempt; past it the log ends with a truncation marker.
    #[serde(default = "default_log_bytes")]
    pub max_log_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            run_timeout_secs: default_timeout_secs(),
            max_artifact_bytes: default_artifact_bytes(),
            max_log_bytes: default_log_bytes(),
        }
    }
}

fn default_timeout_secs() -> u64 {
    3600
}

fn default_log_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_artifact_bytes() -> u64 {
    512 * 1024 * 1024
}

/// How many runs build at once. Beyond the caps runs wait in order, with a queue position;
/// the fleet's free slots bound it further (agents take jobs only when a slot is free).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheduling {
    /// Runs dispatched at once across all repositories; 0 for no cap.
    #[serde(default)]
    pub global_cap: u32,
}

/// Leases and retries: how a run survives its agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reliability {
    /// A claimed attempt is a lease this long, renewed by the agent's heartbeats (every third
    /// of it). An attempt whose lease runs out (its agent died or lost the coordinator for that
    /// long) is retried as a new attempt; its agent stops it by itself at three quarters.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// Attempts of one run before it ends `error` and its job is dead-lettered (a poison job).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

impl Default for Reliability {
    fn default() -> Self {
        Reliability {
            lease_secs: default_lease_secs(),
            max_attempts: default_max_attempts(),
        }
    }
}

fn default_lease_secs() -> u64 {
    60
}

fn default_max_attempts() -> u32 {
    3
}

/// Drops isolations a missed `closed` webhook left behind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweeper {
    /// How often it looks; 0 turns it off.
    #[serde(default = "default_sweep_interval")]
    pub interval_secs: u64,
    /// An isolation whose last build ended longer ago than this, of a PR that is closed or
    /// unknown, is dropped.
    #[serde(default = "default_sweep_age")]
    pub max_age_secs: u64,
}

impl Default for Sweeper {
    fn default() -> Self {
        Sweeper {
            interval_secs: default_sweep_interval(),
            max_age_secs: default_sweep_age(),
        }
    }
}

fn default_sweep_interval() -> u64 {
    3600
}

fn default_sweep_age() -> u64 {
    7 * 24 * 3600
}

/// GitHub (or GitHub Enterprise Server) integration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// REST API base: `https://api.github.com`, or `https://HOST/api/v3` for Enterprise Server.
    #[serde(default = "default_github_api")]
    pub api_url: String,
    /// Secret of the repository's or organisation's webhook (`X-Hub-Signature-256`).
    pub webhook_secret: Option<String>,
    pub webhook_secret_file: Option<PathBuf>,
    /// A token with `statuses: write` and `pull_requests: write` (or `repo`)...
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// ...or a GitHub App: its id and private key (PEM); the installation is looked up per
    /// repository unless `app_installation_id` is set.
    pub app_id: Option<u64>,
    pub app_private_key_file: Option<PathBuf>,
    pub app_installation_id: Option<u64>,
    /// Commit status context.
    #[serde(default = "default_status_context")]
    pub status_context: String,
}

impl std::fmt::Debug for GitHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubConfig")
            .field("api_url", &self.api_url)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<masked>"),
            )
            .field("token", &self.token.as_ref().map(|_| "<masked>"))
            .field("app_id", &self.app_id)
            .field("app_private_key_file", &self.app_private_key_file)
            .field("status_context", &self.status_context)
            .finish()
    }
}

fn default_github_api() -> String {
    "https://api.github.com".to_owned()
}

fn default_status_context() -> String {
    "slimci/dbt".to_owned()
}

/// How the coordinator authenticates to GitHub.
#[derive(Clone)]
pub enum GitHubAuth {
    Token(String),
    App {
        app_id: u64,
        private_key_pem: Vec<u8>,
        installation_id: Option<u64>,
    },
}

impl std::fmt::Debug for GitHubAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitHubAuth::Token(_) => f.write_str("Token(<masked>)"),
            GitHubAuth::App {
                app_id,
                installation_id,
                ..
            } => {
                write!(
                    f,
                    "App {{ app_id: {app_id}, installation_id: {installation_id:?}, key: <masked> }}"
                )
            }
        }
    }
}

/// One dbt repository the coordinator builds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub name: RepoName,
    /// What agents fetch from: an https URL, or a path on the runner VMs. Never credentials;
    /// agents add their own.
    pub clone_url: String,
    #[serde(default = "default_branch")]
    pub production_branch: String,
    /// The dbt project's directory inside the repository, if not the root.
    #[serde(default)]
    pub project_dir: String,
    pub run_timeout_secs: Option<u64>,
    /// The GitHub repository (`owner/name`) whose webhooks map here and where statuses and
    /// comments go.
    pub github: Option<String>,
    /// Build draft pull requests too.
    #[serde(default)]
    pub build_drafts: bool,
    /// Runs of this repository dispatched at once; 0 for no cap.
    #[serde(default)]
    pub max_concurrent: u32,
    /// Whether slimci deploys this repository. `false` for a team whose production job runs
    /// elsewhere and publishes its manifest (`slimci state publish`): deploy requests are
    /// refused, and pushes to the production branch queue nothing.
    #[serde(default = "default_deploys")]
    pub deploys: bool,
    /// Where production lives and PR schemas go on a server warehouse (PostgreSQL,
    /// Snowflake); carried by every job of the repository.
    pub warehouse: Option<RepositoryWarehouseConfig>,
    /// Where the production state comes from: slimci (deploys, publishes) or dbt Cloud.
    #[serde(default)]
    pub production_source: ProductionSource,
    /// The repository's dbt Cloud account and jobs (README "Hybrid with dbt Cloud").
    pub dbt_cloud: Option<DbtCloudConfig>,
}

/// `[repository.warehouse]`: see `slimci_proto::RepositoryWarehouse`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryWarehouseConfig {
    pub database: String,
    pub schema: String,
    pub ci_database: Option<String>,
    /// Snowflake: the role and warehouse this repository's builds use, instead of the agents'.
    pub role: Option<String>,
    pub warehouse: Option<String>,
}

impl RepositoryWarehouseConfig {
    pub fn to_job(&self) -> RepositoryWarehouse {
        RepositoryWarehouse {
            database: self.database.clone(),
            schema: self.schema.clone(),
            ci_database: self.ci_database.clone(),
            role: self.role.clone(),
            warehouse: self.warehouse.clone(),
        }
    }
}

/// Whether `name` is a plain identifier (letters, digits, `_`, `$`, not starting with a digit,
/// at most 63 characters), safe to write into a profile and to compare as the warehouse folds
/// it.
fn plain_identifier(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$'))
}

fn default_branch() -> String {
    "main".to_owned()
}

fn default_deploys() -> bool {
    true
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error("{0}")]
    Invalid(String),
}

/// Secrets resolved from the config or the files it names.
#[derive(Clone)]
pub struct Secrets {
    pub amqp_url: String,
    pub agent_token: String,
    pub api_token: Option<String>,
    pub github_webhook_secret: Option<String>,
    pub github_auth: Option<GitHubAuth>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<masked>)")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = load_toml(path, "coordinator")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: repository names whose isolation names would collide, empty
    /// fields, a prefix that is not a plain name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut slugs: HashMap<String, &RepoName> = HashMap::new();
        for repository in &self.repositories {
            // Isolation names keep at most 63 bytes, cutting the slug: compare what is kept
            // with the longest PR number (`IsolationName::for_pr` of u64::MAX).
            let kept = IsolationName::for_pr(&repository.name, PrNumber(u64::MAX))
                .as_str()
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .to_owned();
            if let Some(other) = slugs.insert(kept.clone(), &repository.name) {
                return Err(ConfigError::Invalid(format!(
                    "repositories `{other}` and `{}` would share PR isolation names (both become `{kept}<n>`, isolation names keeping at most 63 bytes); rename one",
                    repository.name,
                )));
            }
            if repository.clone_url.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "repository `{}` has an empty clone_url",
                    repository.name
                )));
            }
            let url = repository.clone_url.as_str();
            if url
                .split_once("://")
                .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or_default().contains('@'))
            {
                return Err(ConfigError::Invalid(format!(
                    "repository `{}`: clone_url carries credentials; jobs would carry them to every agent. Give agents a token in their own configuration ([git] https_token_file) instead",
                    repository.name
                )));
            }
            if repository.project_dir.starts_with('/')
                || repository.project_dir.split('/').any(|part| part == "..")
            {
                return Err(ConfigError::Invalid(format!(
                    "repository `{}`: project_dir must stay inside the repository",
                    repository.name
                )));
            }
            DbtCloudConfig::check(
                repository.dbt_cloud.as_ref(),
                repository.name.as_str(),
                repository.production_source,
                repository.deploys,
            )
            .map_err(ConfigError::Invalid)?;
            if let Some(warehouse) = &repository.warehouse {
                let names = [
                    ("database", Some(&warehouse.database)),
                    ("schema", Some(&warehouse.schema)),
                    ("ci_database", warehouse.ci_database.as_ref()),
                    ("role", warehouse.role.as_ref()),
                    ("warehouse", warehouse.warehouse.as_ref()),
                ];
                for (key, value) in names {
                    if let Some(value) = value
                        && !plain_identifier(value)
                    {
                        return Err(ConfigError::Invalid(format!(
                            "repository `{}`: warehouse.{key} `{value}` must be a plain identifier (letters, digits, `_`, `$`, not starting with a digit, at most 63 characters)",
                            repository.name
                        )));
                    }
                }
                if warehouse.schema.to_ascii_lowercase().starts_with("pr_") {
                    return Err(ConfigError::Invalid(format!(
                        "repository `{}`: warehouse.schema `{}` starts like a PR isolation (`pr_`); a teardown could take it for one",
                        repository.name, warehouse.schema
                    )));
                }
            }
        }
        // A PR's schemas are `pr_<slug>_<n>` and `pr_<slug>_<n>_<custom>`: slugs `shop` and
        // `shop_1` would make `pr_shop_1_5` (shop_1's PR 5) look like a custom schema of
        // shop's PR 1, which its teardown drops.
        for a in &self.repositories {
            for b in &self.repositories {
                let (short, long) = (a.name.slug(), b.name.slug());
                if long
                    .strip_prefix(&format!("{short}_"))
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                {
                    return Err(ConfigError::Invalid(format!(
                        "repositories `{}` and `{}`: PR schemas of `{}` (`pr_{long}_<n>`) would look like custom schemas of a PR of `{}` (`pr_{short}_<n>_<custom>`), which its teardown drops; rename one",
                        a.name, b.name, b.name, a.name
                    )));
                }
            }
        }
        let prefix_ok = !self.amqp.prefix.is_empty()
            && self
                .amqp
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !prefix_ok {
            return Err(ConfigError::Invalid(format!(
                "amqp.prefix `{}` must be letters, digits, `-`, `_` or `.`",
                self.amqp.prefix
            )));
        }
        Ok(())
    }

    pub fn secrets(&self) -> Result<Secrets, ConfigError> {
        let amqp_url = inline_or_file("amqp.url", &self.amqp.url, &self.amqp.url_file)?
            .ok_or_else(|| ConfigError::Invalid("set amqp.url or amqp.url_file".to_owned()))?;
        let agent_token = inline_or_file(
            "auth.agent_token",
            &self.auth.agent_token,
            &self.auth.agent_token_file,
        )?
        .ok_or_else(|| {
            ConfigError::Invalid("set auth.agent_token or auth.agent_token_file".to_owned())
        })?;
        if agent_token.len() < 16 {
            return Err(ConfigError::Invalid(
                "auth.agent_token must be at least 16 characters".to_owned(),
            ));
        }
        let api_token = inline_or_file(
            "auth.api_token",
            &self.auth.api_token,
            &self.auth.api_token_file,
        )?;
        let (github_webhook_secret, github_auth) = match &self.github {
            None => (None, None),
            Some(github) => {
                let secret = inline_or_file(
                    "github.webhook_secret",
                    &github.webhook_secret,
                    &github.webhook_secret_file,
                )?;
                let token = inline_or_file("github.token", &github.token, &github.token_file)?;
                let auth = match (token, github.app_id, &github.app_private_key_file) {
                    (Some(_), Some(_), _) => {
                        return Err(ConfigError::Invalid(
                            "set github.token or github.app_id, not both".to_owned(),
                        ));
                    }
                    (Some(token), None, _) => Some(GitHubAuth::Token(token)),
                    (None, Some(app_id), Some(path)) => Some(GitHubAuth::App {
                        app_id,
                        private_key_pem: std::fs::read(path).map_err(|source| {
                            ConfigFileError::Read {
                                path: path.clone(),
                                source,
                            }
                        })?,
                        installation_id: github.app_installation_id,
                    }),
                    (None, Some(_), None) => {
                        return Err(ConfigError::Invalid(
                            "github.app_id needs github.app_private_key_file".to_owned(),
                        ));
                    }
                    (None, None, _) => None,
                };
                (secret, auth)
            }
        };
        Ok(Secrets {
            amqp_url,
            agent_token,
            api_token,
            github_webhook_secret,
            github_auth,
        })
    }

    pub fn repository(&self, name: &str) -> Option<&RepositoryConfig> {
        self.repositories
            .iter()
            .find(|repository| repository.name.as_str() == name)
    }

    /// The repository a GitHub `owner/name` maps to (GitHub names are case-insensitive).
    pub fn repository_for_github(&self, full_name: &str) -> Option<&RepositoryConfig> {
        self.repositories.iter().find(|repository| {
            repository
                .github
                .as_deref()
                .is_some_and(|github| github.eq_ignore_ascii_case(full_name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            slimci_config_file::parse_toml(text, Path::new("test.toml"), "coordinator")?;
        config.validate()?;
        Ok(config)
    }

    const BASE: &str = r#"
        data_dir = "/tmp/x"
        [amqp]
        url = "amqp://127.0.0.1"
        [auth]
        agent_token = "0123456789abcdef"
    "#;

    #[test]
    fn minimal_config_has_defaults() {
        let config = parse(&format!(
            "{BASE}\n[[repository]]\nname = \"shop\"\nclone_url = \"/srv/shop.git\"\n"
        ))
        .unwrap();
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.amqp.prefix, "slimci");
        assert_eq!(config.repositories[0].production_branch, "main");
        assert!(config.repositories[0].deploys, "slimci deploys by default");
        assert_eq!(config.limits.run_timeout_secs, 3600);
    }

    #[test]
    fn deploys_can_be_turned_off_per_repository() {
        let config = parse(&format!(
            "{BASE}\n[[repository]]\nname = \"shop\"\nclone_url = \"x\"\ndeploys = false\n[[repository]]\nname = \"web\"\nclone_url = \"y\"\n"
        ))
        .unwrap();
        assert!(!config.repositories[0].deploys);
        assert!(config.repositories[1].deploys);
        let error = parse(&format!(
            "{BASE}\n[[repository]]\nname = \"shop\"\nclone_url = \"x\"\ndeploys = \"no\"\n"
        ))
        .unwrap_err();
        assert!(format!("{error:#}").contains("deploys"), "{error:#}");
    }

    #[test]
    fn colliding_slugs_are_refused() {
        let text = format!(
            "{BASE}\n[[repository]]\nname = \"a-b\"\nclone_url = \"x\"\n[[repository]]\nname = \"a_b\"\nclone_url = \"y\"\n"
        );
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("would share PR isolation names"), "{error}");
    }

    #[test]
    fn long_names_that_would_share_isolation_names_are_refused() {
        let long = "a".repeat(45);
        let text = format!(
            "{BASE}\n[[repository]]\nname = \"{long}_one\"\nclone_url = \"x\"\n[[repository]]\nname = \"{long}_two\"\nclone_url = \"y\"\n"
        );
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("would share PR isolation names"), "{error}");
    }

    #[test]
    fn slugs_whose_pr_schemas_would_look_like_anothers_custom_schemas_are_refused() {
        let text = format!(
            "{BASE}\n[[repository]]\nname = \"shop\"\nclone_url = \"x\"\n[[repository]]\nname = \"shop_1\"\nclone_url = \"y\"\n"
        );
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("would look like custom schemas"), "{error}");
        let text = format!(
            "{BASE}\n[[repository]]\nname = \"shop\"\nclone_url = \"x\"\n[[repository]]\nname = \"shop_eu\"\nclone_url = \"y\"\n"
        );
        parse(&text).unwrap();
    }

    #[test]
    fn repository_warehouse_settings_are_plain_identifiers() {
        let repository = |warehouse: &str| {
            format!(
                "{BASE}\n[[repository]]\nname = \"shop\"\nclone_url = \"x\"\n[repository.warehouse]\n{warehouse}\n"
            )
        };
        let config = parse(&repository(
            "database = \"analytics\"\nschema = \"analytics\"",
        ))
        .unwrap();
        let settings = config.repositories[0].warehouse.as_ref().unwrap().to_job();
        assert_eq!(settings.ci_database(), "analytics");
        let error = parse(&repository(
            "database = \"analytics\"\nschema = \"a; drop\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("plain identifier"), "{error}");
        let error = parse(&repository(
            "database = \"analytics\"\nschema = \"pr_main\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("starts like a PR isolation"), "{error}");
        let error = parse(&repository("database = \"analytics\""))
            .unwrap_err()
            .to_string();
        assert!(error.contains("schema"), "{error}");
    }

    #[test]
    fn credentials_in_clone_urls_are_refused() {
        let text = format!(
            "{BASE}\n[[repository]]\nname = \"a\"\nclone_url = \"https://x:ghp_secret@github.com/acme/a.git\"\n"
        );
        assert!(
            parse(&text)
                .unwrap_err()
                .to_string()
                .contains("carries credentials")
        );
        let ssh =
            format!("{BASE}\n[[repository]]\nname = \"a\"\nclone_url = \"/srv/git/a@2024.git\"\n");
        assert!(parse(&ssh).is_ok(), "an @ in a path is not a credential");
        let absolute = format!(
            "{BASE}\n[[repository]]\nname = \"a\"\nclone_url = \"x\"\nproject_dir = \"/etc\"\n"
        );
        assert!(parse(&absolute).is_err());
    }

    #[test]
    fn the_shipped_example_is_a_valid_configuration() {
        let example: Config =
            toml::from_str(include_str!("../../examples/coordinator.toml")).unwrap();
        example.validate().unwrap();
        assert!(!example.repositories.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(parse(&format!("{BASE}\nlisten_addr = \"x\"\n")).is_err());
    }

    #[test]
    fn secrets_never_print() {
        let config = parse(BASE).unwrap();
        assert!(!format!("{:?}", config.auth).contains("0123456789abcdef"));
        assert!(!format!("{:?}", config.secrets().unwrap()).contains("0123456789abcdef"));
    }
}
