//! The agent's configuration file (TOML). It holds the agent's own credentials (broker,
//! coordinator, git, warehouse); none of them travel in job messages, and none reach dbt except
//! what its profile needs.

use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use slimci_broker::AmqpConfig;
use slimci_config_file::{ConfigFileError, inline_or_file, load_toml};
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
    /// Deprecated spelling of `sandbox.grace_secs`, still accepted.
    #[serde(default)]
    pub cancel_grace_secs: Option<u64>,
    /// After the first SIGTERM, how long running jobs may take to finish; then they are
    /// stopped and released, and the coordinator retries them on another agent.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    pub amqp: AmqpConfig,
    pub coordinator: CoordinatorConfig,
    #[serde(default)]
    pub git: GitConfig,
    pub warehouse: WarehouseConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Start each slot's next dbt ahead of its job (Python and dbt loaded, confined to the
    /// build's own rules when the job arrives); saves the ~2 s dbt takes to load.
    #[serde(default = "default_true")]
    pub prestart_dbt: bool,
    /// OpenTelemetry: OTLP export of this agent's spans of each run.
    #[serde(default)]
    pub telemetry: slimci_telemetry::TelemetryConfig,
    /// The file this was loaded from (its directory is hidden from dbt).
    #[serde(skip)]
    pub source: Option<PathBuf>,
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

/// How every dbt process is confined (see `sandbox`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Refuse to build when a protection is unavailable (landlock, cgroup limits, the PID
    /// namespace, the build user), instead of warning and building without it.
    #[serde(default)]
    pub required: bool,
    /// The user dbt runs as when the agent runs as root. Ignored (dbt runs as the agent's own
    /// user) when the agent is not root.
    #[serde(default = "default_build_user")]
    pub user: String,
    /// Memory of one dbt process tree, in bytes (cgroup `memory.max` / `memory.limit_in_bytes`).
    #[serde(default = "default_memory_limit")]
    pub memory_limit: u64,
    /// Processes and threads of one dbt process tree (cgroup `pids.max`).
    #[serde(default = "default_pids_limit")]
    pub pids_limit: u64,
    /// Open files per process (`RLIMIT_NOFILE`).
    #[serde(default = "default_nofile")]
    pub nofile: u64,
    /// Seconds between SIGTERM and SIGKILL of the whole tree on cancel or timeout.
    #[serde(default = "default_grace")]
    pub grace_secs: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            required: false,
            user: default_build_user(),
            memory_limit: default_memory_limit(),
            pids_limit: default_pids_limit(),
            nofile: default_nofile(),
            grace_secs: default_grace(),
        }
    }
}

/// The agent's disk caches (git, production manifests, dbt's parse, packages): see `cache`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Where they live. Default: `<work_dir>/cache`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Their total size in bytes; past it the least recently used entries are removed after
    /// each run (entries a running build uses are kept).
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: u64,
    /// Deploys parse production's code for CI builds and publish it; every build starts from
    /// the saved parse whose profile, target, dbt version and packages match its own (dbt still
    /// checks each file and reparses what changed). Only deploys save parses.
    #[serde(default = "default_true")]
    pub partial_parse: bool,
    /// Restore the packages a deploy installed, by the hash of the package files, instead of
    /// running `dbt deps` again. Only deploys save packages.
    #[serde(default = "default_true")]
    pub deps: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: None,
            max_bytes: default_cache_bytes(),
            partial_parse: true,
            deps: true,
        }
    }
}

impl Config {
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .dir
            .clone()
            .unwrap_or_else(|| self.work_dir.join("cache"))
    }
}

fn default_cache_bytes() -> u64 {
    10 * 1024 * 1024 * 1024
}

fn default_true() -> bool {
    true
}

fn default_build_user() -> String {
    "slimci-build".to_owned()
}

fn default_memory_limit() -> u64 {
    4 * 1024 * 1024 * 1024
}

fn default_pids_limit() -> u64 {
    512
}

fn default_nofile() -> u64 {
    4096
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
    /// deploy builds a copy and swaps it in), each PR gets `<repo>/pr/<isolation>/pr.duckdb`, which
    /// attaches production read-only. Agents that share a repository must share `root`.
    Duckdb {
        root: PathBuf,
        #[serde(default = "default_threads")]
        threads: u32,
        /// Deploy databases kept besides the current one, for CI runs still comparing against
        /// an older production state.
        #[serde(default = "default_keep")]
        keep_deploys: usize,
        /// Warehouse credentials by name. Each reaches dbt only as `DBT_ENV_SECRET_<NAME>`, and
        /// only when the profile the agent writes references it.
        #[serde(default)]
        secrets: std::collections::BTreeMap<String, WarehouseSecret>,
    },
    /// A PostgreSQL server. Production is the repository's `[repository.warehouse]` database
    /// and schema on the coordinator; each PR builds into schemas `pr_<slug>_<n>` (and
    /// `pr_<slug>_<n>_<custom>`) of the same database, reading unchanged parents from
    /// production through the production manifest.
    Postgres {
        host: String,
        #[serde(default = "default_postgres_port")]
        port: u16,
        user: String,
        /// The password, inline or in a file; it reaches dbt only as
        /// `DBT_ENV_SECRET_POSTGRES_PASSWORD`.
        password: Option<String>,
        password_file: Option<PathBuf>,
        /// libpq's `sslmode` (`disable`, `require`, `verify-full`, ...); libpq's default when
        /// unset.
        sslmode: Option<String>,
        #[serde(default = "default_threads")]
        threads: u32,
    },
    /// A Snowflake account. Production is the repository's `[repository.warehouse]` database
    /// and schema; each PR builds into schemas `pr_<slug>_<n>` (and `_<custom>`) of its
    /// `ci_database`. Key-pair authentication (`private_key_path`, a PKCS#8 PEM file, with an
    /// optional passphrase), or a password only if `password`/`password_file` is set instead.
    Snowflake {
        account: String,
        user: String,
        /// Snowflake's role and warehouse for every session; the user's defaults when unset.
        role: Option<String>,
        warehouse: Option<String>,
        private_key_path: Option<PathBuf>,
        private_key_passphrase: Option<String>,
        private_key_passphrase_file: Option<PathBuf>,
        password: Option<String>,
        password_file: Option<PathBuf>,
        #[serde(default = "default_threads")]
        threads: u32,
        /// Another endpoint than `<account>.snowflakecomputing.com` over https (a private link
        /// name, or an emulator in tests).
        host: Option<String>,
        port: Option<u16>,
        protocol: Option<String>,
    },
}

impl WarehouseConfig {
    /// The DuckDB warehouse's root directory, if that is the type.
    pub fn duckdb_root(&self) -> Option<&Path> {
        match self {
            WarehouseConfig::Duckdb { root, .. } => Some(root),
            WarehouseConfig::Postgres { .. } | WarehouseConfig::Snowflake { .. } => None,
        }
    }

    /// The type's name as configured.
    pub fn type_name(&self) -> &'static str {
        match self {
            WarehouseConfig::Duckdb { .. } => "duckdb",
            WarehouseConfig::Postgres { .. } => "postgres",
            WarehouseConfig::Snowflake { .. } => "snowflake",
        }
    }
}

fn default_postgres_port() -> u16 {
    5432
}

/// One warehouse credential: its value (inline or from a file) and where the profile uses it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseSecret {
    pub value: Option<String>,
    pub value_file: Option<PathBuf>,
    /// The DuckDB setting (`settings:` in the dbt-duckdb profile) that receives it, e.g.
    /// `s3_secret_access_key`. A secret the profile does not use never reaches dbt.
    pub setting: Option<String>,
}

impl std::fmt::Debug for WarehouseSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarehouseSecret")
            .field("value", &self.value.as_ref().map(|_| "<masked>"))
            .field("value_file", &self.value_file)
            .field("setting", &self.setting)
            .finish()
    }
}

/// The environment variable a warehouse secret named `name` reaches dbt as.
pub fn secret_env_name(name: &str) -> String {
    format!("DBT_ENV_SECRET_{}", name.to_ascii_uppercase())
}

/// The name of a PostgreSQL warehouse's password among the warehouse secrets.
pub const POSTGRES_PASSWORD: &str = "postgres_password";
/// A Snowflake warehouse's secrets: its private key (the PEM text, written into each run
/// directory for that build alone), the key's passphrase, or its password.
pub const SNOWFLAKE_PRIVATE_KEY: &str = "snowflake_private_key";
pub const SNOWFLAKE_PRIVATE_KEY_PASSPHRASE: &str = "snowflake_private_key_passphrase";
pub const SNOWFLAKE_PASSWORD: &str = "snowflake_password";

/// Shortest warehouse secret value accepted: shorter ones would redact ordinary log text.
pub const MIN_SECRET_CHARS: usize = 6;

fn default_threads() -> u32 {
    4
}

fn default_keep() -> usize {
    3
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error("{0}")]
    Invalid(String),
}

/// Credentials resolved from the config or the files it names. Never printed.
#[derive(Clone)]
pub struct Secrets {
    pub amqp_url: String,
    pub coordinator_token: String,
    pub git_https_token: Option<String>,
    /// Warehouse secrets by name, resolved.
    pub warehouse: Vec<ResolvedSecret>,
}

/// A warehouse secret with its value read.
#[derive(Clone)]
pub struct ResolvedSecret {
    pub name: String,
    pub value: String,
    pub setting: Option<String>,
}

impl ResolvedSecret {
    /// The environment variable dbt reads it from: dbt scrubs `DBT_ENV_SECRET_*` values from
    /// its own logs, and allows them only in profiles.yml and packages.yml.
    pub fn env_name(&self) -> String {
        secret_env_name(&self.name)
    }
}

impl Secrets {
    /// Every value that must never appear in a stored log: the warehouse secrets and the
    /// agent's own credentials.
    pub fn redacted_values(&self) -> Vec<String> {
        let mut values: Vec<String> = self
            .warehouse
            .iter()
            .map(|secret| secret.value.clone())
            .collect();
        values.push(self.amqp_url.clone());
        values.push(self.coordinator_token.clone());
        values.extend(self.git_https_token.clone());
        values.retain(|value| !value.is_empty());
        values
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<masked>)")
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
        let config: Config = load_toml(path, "agent")?;
        config.validate()?;
        let dbt = resolve_executable(&config.dbt)?;
        Ok(Config {
            dbt,
            source: Some(path.to_owned()),
            ..config
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.telemetry.metrics_listen.is_some() {
            return Err(ConfigError::Invalid(
                "telemetry.metrics_listen is a coordinator setting: the agent's figures reach the coordinator's /metrics with its events".to_owned(),
            ));
        }
        if self.slots == 0 {
            return Err(ConfigError::Invalid("slots must be at least 1".to_owned()));
        }
        if self.cancel_grace_secs.is_some() && self.sandbox.grace_secs != default_grace() {
            return Err(ConfigError::Invalid(
                "set `sandbox.grace_secs` only; `cancel_grace_secs` is its old name".to_owned(),
            ));
        }
        if self.sandbox.pids_limit < 16 {
            return Err(ConfigError::Invalid(
                "sandbox.pids_limit must be at least 16: dbt alone runs a dozen threads".to_owned(),
            ));
        }
        if self.sandbox.memory_limit < 64 * 1024 * 1024 {
            return Err(ConfigError::Invalid(
                "sandbox.memory_limit must be at least 64 MiB (it is in bytes)".to_owned(),
            ));
        }
        if self.sandbox.nofile < 64 {
            return Err(ConfigError::Invalid(
                "sandbox.nofile must be at least 64".to_owned(),
            ));
        }
        if self.sandbox.user.is_empty() {
            return Err(ConfigError::Invalid(
                "sandbox.user must name a user".to_owned(),
            ));
        }
        let no_secrets = std::collections::BTreeMap::new();
        let secrets = match &self.warehouse {
            WarehouseConfig::Duckdb { secrets, .. } => secrets,
            WarehouseConfig::Postgres { .. } | WarehouseConfig::Snowflake { .. } => &no_secrets,
        };
        if let WarehouseConfig::Snowflake {
            private_key_path,
            password,
            password_file,
            private_key_passphrase,
            private_key_passphrase_file,
            ..
        } = &self.warehouse
        {
            let password = password.is_some() || password_file.is_some();
            let passphrase =
                private_key_passphrase.is_some() || private_key_passphrase_file.is_some();
            if private_key_path.is_some() == password {
                return Err(ConfigError::Invalid(
                    "a snowflake warehouse needs exactly one of private_key_path (key-pair authentication) and password or password_file".to_owned(),
                ));
            }
            if passphrase && private_key_path.is_none() {
                return Err(ConfigError::Invalid(
                    "warehouse.private_key_passphrase is for private_key_path".to_owned(),
                ));
            }
        }
        for (name, secret) in secrets {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::Invalid(format!(
                    "warehouse secret name `{name}`: use letters, digits and `_` (it becomes DBT_ENV_SECRET_{})",
                    name.to_ascii_uppercase()
                )));
            }
            if let Some(setting) = &secret.setting
                && (setting.is_empty()
                    || !setting
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_'))
            {
                return Err(ConfigError::Invalid(format!(
                    "warehouse secret `{name}`: setting `{setting}` is not a DuckDB setting name"
                )));
            }
        }
        Ok(())
    }

    /// Seconds between SIGTERM and SIGKILL of a build's process tree.
    pub fn grace_secs(&self) -> u64 {
        self.cancel_grace_secs.unwrap_or(self.sandbox.grace_secs)
    }

    /// The agent's configuration file and every secret file it names: dbt may not read them.
    pub fn protected_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = [
            &self.amqp.url_file,
            &self.coordinator.token_file,
            &self.git.https_token_file,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        match &self.warehouse {
            WarehouseConfig::Duckdb { secrets, .. } => {
                files.extend(secrets.values().filter_map(|s| s.value_file.clone()));
            }
            WarehouseConfig::Postgres { password_file, .. } => {
                files.extend(password_file.clone());
            }
            WarehouseConfig::Snowflake {
                private_key_path,
                private_key_passphrase_file,
                password_file,
                ..
            } => files.extend(
                [private_key_path, private_key_passphrase_file, password_file]
                    .into_iter()
                    .flatten()
                    .cloned(),
            ),
        }
        files
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
            warehouse: self.warehouse_secrets()?,
        })
    }

    fn warehouse_secrets(&self) -> Result<Vec<ResolvedSecret>, ConfigError> {
        let secrets = match &self.warehouse {
            WarehouseConfig::Duckdb { secrets, .. } => secrets,
            WarehouseConfig::Postgres {
                password,
                password_file,
                ..
            } => {
                let value = inline_or_file("warehouse.password", password, password_file)?
                    .ok_or_else(|| {
                        ConfigError::Invalid(
                            "set warehouse.password or warehouse.password_file".to_owned(),
                        )
                    })?;
                return Ok(vec![ResolvedSecret {
                    name: POSTGRES_PASSWORD.to_owned(),
                    value,
                    setting: None,
                }]);
            }
            WarehouseConfig::Snowflake {
                private_key_path,
                private_key_passphrase,
                private_key_passphrase_file,
                password,
                password_file,
                ..
            } => {
                let mut resolved = Vec::new();
                let mut add = |name: &str, value: Option<String>| {
                    if let Some(value) = value {
                        resolved.push(ResolvedSecret {
                            name: name.to_owned(),
                            value,
                            setting: None,
                        });
                    }
                };
                let key = private_key_path
                    .as_ref()
                    .map(|path| {
                        std::fs::read_to_string(path).map_err(|error| {
                            ConfigError::Invalid(format!(
                                "warehouse.private_key_path {}: {error}",
                                path.display()
                            ))
                        })
                    })
                    .transpose()?;
                if let Some(key) = &key
                    && !key.contains("PRIVATE KEY-----")
                {
                    return Err(ConfigError::Invalid(
                        "warehouse.private_key_path is not a PEM private key (-----BEGIN PRIVATE KEY----- or ENCRYPTED PRIVATE KEY)".to_owned(),
                    ));
                }
                add(SNOWFLAKE_PRIVATE_KEY, key);
                add(
                    SNOWFLAKE_PRIVATE_KEY_PASSPHRASE,
                    inline_or_file(
                        "warehouse.private_key_passphrase",
                        private_key_passphrase,
                        private_key_passphrase_file,
                    )?,
                );
                add(
                    SNOWFLAKE_PASSWORD,
                    inline_or_file("warehouse.password", password, password_file)?,
                );
                return Ok(resolved);
            }
        };
        let mut resolved = Vec::new();
        for (name, secret) in secrets {
            let what = format!("warehouse.secrets.{name}.value");
            let value = inline_or_file(&what, &secret.value, &secret.value_file)?
                .ok_or_else(|| ConfigError::Invalid(format!("set `{what}` or `{what}_file`")))?;
            if value.chars().count() < MIN_SECRET_CHARS {
                return Err(ConfigError::Invalid(format!(
                    "warehouse secret `{name}` is shorter than {MIN_SECRET_CHARS} characters; a value that short cannot be redacted from logs without mangling them"
                )));
            }
            resolved.push(ResolvedSecret {
                name: name.clone(),
                value,
                setting: secret.setting.clone(),
            });
        }
        Ok(resolved)
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
        assert_eq!(example.sandbox.user, "slimci-build");
        assert_eq!(example.grace_secs(), 10);
        example.validate().unwrap();
    }

    #[test]
    fn the_shipped_examples_per_warehouse_are_valid_configurations() {
        let postgres: Config =
            toml::from_str(include_str!("../../examples/agent-postgres.toml")).unwrap();
        postgres.validate().unwrap();
        assert_eq!(postgres.warehouse.type_name(), "postgres");
        let snowflake: Config =
            toml::from_str(include_str!("../../examples/agent-snowflake.toml")).unwrap();
        snowflake.validate().unwrap();
        assert_eq!(snowflake.warehouse.type_name(), "snowflake");
        assert!(
            snowflake
                .protected_files()
                .contains(&PathBuf::from("/etc/slimci/snowflake_key.p8"))
        );
    }

    #[test]
    fn a_snowflake_warehouse_needs_exactly_one_way_to_log_in() {
        let snowflake = |auth: &str| {
            let text = format!(
                "name = \"a\"\nwork_dir = \"/tmp/w\"\n[amqp]\nurl = \"amqp://localhost/\"\n[coordinator]\nurl = \"http://c\"\ntoken = \"tok\"\n[warehouse]\ntype = \"snowflake\"\naccount = \"x\"\nuser = \"u\"\n{auth}\n"
            );
            let config: Config = toml::from_str(&text).unwrap();
            config.validate().map_err(|error| error.to_string())
        };
        let error = snowflake("").unwrap_err();
        assert!(error.contains("exactly one of private_key_path"), "{error}");
        let error = snowflake("private_key_path = \"/k\"\npassword = \"secret-pw\"").unwrap_err();
        assert!(error.contains("exactly one of private_key_path"), "{error}");
        snowflake("private_key_path = \"/k\"").unwrap();
        snowflake("password = \"secret-pw\"").unwrap();
    }

    fn minimal(extra: &str) -> Result<Config, String> {
        let text = format!(
            r#"
            name = "a"
            work_dir = "/tmp/w"
            {extra}
            [amqp]
            url = "amqp://localhost/"
            [coordinator]
            url = "http://c"
            token = "tok"
            [warehouse]
            type = "duckdb"
            root = "/tmp/r"
            "#
        );
        let config: Config = toml::from_str(&text).map_err(|error| error.to_string())?;
        config.validate().map_err(|error| error.to_string())?;
        Ok(config)
    }

    #[test]
    fn the_sandbox_has_safe_defaults() {
        let config = minimal("").unwrap();
        assert!(!config.sandbox.required);
        assert_eq!(config.sandbox.user, "slimci-build");
        assert_eq!(config.sandbox.memory_limit, 4 << 30);
        assert_eq!(config.sandbox.pids_limit, 512);
        assert_eq!(config.sandbox.nofile, 4096);
        assert_eq!(config.grace_secs(), 10);
    }

    #[test]
    fn the_old_grace_key_still_works_but_not_with_the_new_one() {
        assert_eq!(minimal("cancel_grace_secs = 4").unwrap().grace_secs(), 4);
        let config = minimal("[sandbox]\ngrace_secs = 2\nrequired = true").unwrap();
        assert_eq!(config.grace_secs(), 2);
        assert!(config.sandbox.required);
        let both = "cancel_grace_secs = 4\n[sandbox]\ngrace_secs = 2";
        assert!(
            minimal(both)
                .unwrap_err()
                .contains("`cancel_grace_secs` is its old name")
        );
    }

    #[test]
    fn sandbox_limits_are_checked() {
        assert!(
            minimal("[sandbox]\npids_limit = 3")
                .unwrap_err()
                .contains("pids_limit")
        );
        assert!(
            minimal("[sandbox]\nmemory_limit = 1000")
                .unwrap_err()
                .contains("64 MiB")
        );
        assert!(
            minimal("[sandbox]\nnofile = 8")
                .unwrap_err()
                .contains("nofile")
        );
        assert!(
            minimal("[sandbox]\nuser = \"\"")
                .unwrap_err()
                .contains("sandbox.user")
        );
        assert!(
            minimal("[sandbox]\nmemory = 5")
                .unwrap_err()
                .contains("unknown field")
        );
    }

    #[test]
    fn warehouse_secrets_are_named_resolved_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s3");
        std::fs::write(&file, "  from-a-file-secret\n").unwrap();
        let extra = format!(
            r#"
            [warehouse.secrets.s3_key]
            value_file = "{}"
            setting = "s3_secret_access_key"
            [warehouse.secrets.other]
            value = "inline-secret"
            "#,
            file.display()
        );
        let text = format!(
            "name = \"a\"\nwork_dir = \"/w\"\n[amqp]\nurl = \"amqp://u:p@h/\"\n[coordinator]\nurl = \"http://c\"\ntoken = \"tok-value\"\n[warehouse]\ntype = \"duckdb\"\nroot = \"/r\"\n{extra}"
        );
        let config: Config = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        let secrets = config.secrets().unwrap();
        let s3 = secrets
            .warehouse
            .iter()
            .find(|s| s.name == "s3_key")
            .unwrap();
        assert_eq!(s3.value, "from-a-file-secret");
        assert_eq!(s3.env_name(), "DBT_ENV_SECRET_S3_KEY");
        assert_eq!(s3.setting.as_deref(), Some("s3_secret_access_key"));
        assert_eq!(config.protected_files(), std::slice::from_ref(&file));
        let redacted = secrets.redacted_values();
        for value in [
            "from-a-file-secret",
            "inline-secret",
            "tok-value",
            "amqp://u:p@h/",
        ] {
            assert!(redacted.contains(&value.to_owned()), "{value}");
        }
        assert!(!format!("{config:?}").contains("inline-secret"));

        let short = text.replace("inline-secret", "abc");
        let config: Config = toml::from_str(&short).unwrap();
        assert!(
            config
                .secrets()
                .unwrap_err()
                .to_string()
                .contains("shorter than 6")
        );
        let bad_name = text.replace("secrets.other", "secrets.\"bad-name\"");
        let config: Config = toml::from_str(&bad_name).unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("bad-name")
        );
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
