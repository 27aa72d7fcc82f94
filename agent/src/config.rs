//! The agent's configuration file (TOML). It holds the agent's own credentials (broker,
//! coordinator, git, warehouse); none of them travel in job messages, and none reach dbt except
//! what its profile needs.

use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use slimci_broker::AmqpConfig;
use slimci_proto::AgentName;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unique in the fleet; shows in run records.
    pub name: AgentName,
    /// Jobs built at once (the job queue prefetch).
    #[serde(default = "default_slots")]
    pub slots: u16,
    /// Git caches, production-state cache and per-run directories live here.
    pub work_dir: PathBuf,
    /// The dbt executable (usually inside a virtualenv).
    #[serde(default = "default_dbt")]
    pub dbt: PathBuf,
    /// How long dbt gets between SIGTERM and SIGKILL on cancel or timeout.
    #[serde(default = "default_grace")]
    pub cancel_grace_secs: u64,
    /// After the first SIGTERM, how long running jobs may take to finish; then they are
    /// stopped and released, and the coordinator retries them on another agent.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    pub amqp: AmqpConfig,
    pub coordinator: CoordinatorConfig,
    #[serde(default)]
    pub git: GitConfig,
    pub warehouse: WarehouseConfig,
}

fn default_slots() -> u16 {
    1
}

fn default_dbt() -> PathBuf {
    PathBuf::from("dbt")
}

fn default_grace() -> u64 {
    10
}

fn default_drain_timeout() -> u64 {
    1800
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Base URL of the coordinator, e.g. `http://10.0.1.5:8080`.
    pub url: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for CoordinatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<masked>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// Token for https clone URLs (sent as the password, user `x-access-token`).
    pub https_token: Option<String>,
    pub https_token_file: Option<PathBuf>,
}

impl std::fmt::Debug for GitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitConfig")
            .field(
                "https_token",
                &self.https_token.as_ref().map(|_| "<masked>"),
            )
            .field("https_token_file", &self.https_token_file)
            .finish()
    }
}

/// Where dbt builds. The agent writes the dbt profile from this for every run.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WarehouseConfig {
    /// Embedded DuckDB files under `root`: production is `<repo>/current/prod.duckdb` (each
    /// deploy builds a copy and swaps it in), each PR gets `<repo>/pr/<isolation>.duckdb`, which
    /// attaches production read-only. Agents that share a repository must share `root`.
    Duckdb {
        root: PathBuf,
        #[serde(default = "default_threads")]
        threads: u32,
        /// Deploy databases kept besides the current one, for CI runs still comparing against
        /// an older production state.
        #[serde(default = "default_keep")]
        keep_deploys: usize,
    },
}

fn default_threads() -> u32 {
    4
}

fn default_keep() -> usize {
    3
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid agent configuration: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Credentials resolved from the config or the files it names. Never printed.
#[derive(Clone)]
pub struct Secrets {
    pub amqp_url: String,
    pub coordinator_token: String,
    pub git_https_token: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<masked>)")
    }
}

fn inline_or_file(
    what: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "set `{what}` or `{what}_file`, not both"
        ))),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(text.trim().to_owned()))
            .map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            }),
        (None, None) => Ok(None),
    }
}

/// The absolute path of `program`: as given when it has a slash, else looked up in the agent's
/// own PATH. dbt's PATH is built from this directory, never from a relative entry, so a
/// checkout can never shadow it.
fn resolve_executable(program: &Path) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    let found = if program.components().count() > 1 {
        Some(std::path::absolute(program).unwrap_or_else(|_| program.to_owned()))
            .filter(|path| executable(path))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .filter(|dir| dir.is_absolute())
                .map(|dir| dir.join(program))
                .find(|path| executable(path))
        })
    };
    found.ok_or_else(|| {
        ConfigError::Invalid(format!(
            "dbt executable `{}` not found or not executable; set `dbt` to the dbt inside your virtualenv",
            program.display()
        ))
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if config.slots == 0 {
            return Err(ConfigError::Invalid("slots must be at least 1".to_owned()));
        }
        let dbt = resolve_executable(&config.dbt)?;
        Ok(Config { dbt, ..config })
    }

    pub fn secrets(&self) -> Result<Secrets, ConfigError> {
        Ok(Secrets {
            amqp_url: inline_or_file("amqp.url", &self.amqp.url, &self.amqp.url_file)?
                .ok_or_else(|| ConfigError::Invalid("set amqp.url or amqp.url_file".to_owned()))?,
            coordinator_token: inline_or_file(
                "coordinator.token",
                &self.coordinator.token,
                &self.coordinator.token_file,
            )?
            .ok_or_else(|| {
                ConfigError::Invalid("set coordinator.token or coordinator.token_file".to_owned())
            })?,
            git_https_token: inline_or_file(
                "git.https_token",
                &self.git.https_token,
                &self.git.https_token_file,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_is_a_valid_configuration() {
        let example: Config = toml::from_str(include_str!("../../examples/agent.toml")).unwrap();
        assert!(example.slots >= 1);
        assert!(format!("{example:?}").contains("Duckdb"));
    }

    #[test]
    fn dbt_is_resolved_to_an_absolute_path() {
        let resolved = resolve_executable(Path::new("sh")).unwrap();
        assert!(resolved.is_absolute(), "{}", resolved.display());
        let error = resolve_executable(Path::new("no-such-dbt-anywhere")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("set `dbt` to the dbt inside your virtualenv")
        );
    }

    #[test]
    fn secrets_never_print() {
        let config: Config = toml::from_str(
            r#"
            name = "a"
            work_dir = "/tmp/w"
            [amqp]
            url = "amqp://guest:hunter2@localhost/"
            [coordinator]
            url = "http://c"
            token = "tok-hunter2"
            [git]
            https_token = "ghp-hunter2"
            [warehouse]
            type = "duckdb"
            root = "/tmp/r"
            "#,
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"), "{config:?}");
    }
}
