//! Where dbt builds, and the dbt profile for each run: DuckDB files on the agent's disk
//! (`duckdb`: a database per PR), or schemas of a PostgreSQL server (`postgres`: production in
//! the repository's database and schema, each PR in schemas of its own isolation name).

mod duckdb;
mod postgres;
mod snowflake;

use std::path::{Path, PathBuf};

use slimci_proto::{CheckedJob, IsolationName, JobKind, RepoName, RunId};

pub use duckdb::{
    DuckDbTarget, DuckDbWarehouse, PR_CATALOG, PRODUCTION_CATALOG, PRODUCTION_LINK, WAREHOUSE_LINK,
};
pub use postgres::PostgresWarehouse;
pub use snowflake::{KEY_FILE, SnowflakeAuth, SnowflakeWarehouse};

#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    #[error("warehouse {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this runner has no production database for repository `{repository}` (looked in {looked}); agents that build one repository must share the DuckDB warehouse root, and only a `slimci deploy` makes a DuckDB production database (a manifest published with `slimci state publish` brings none)"
    )]
    NoProduction { repository: String, looked: String },
    #[error(
        "repository `{0}` has no [repository.warehouse] database and schema on the coordinator; a {1} warehouse needs them to know where production is and where PR schemas go"
    )]
    NoRepositorySettings(String, &'static str),
    #[error("{0} does not exist on this runner")]
    NoIsolation(IsolationName),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WarehouseError + '_ {
    move |source| WarehouseError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The warehouse this agent builds in.
pub enum Warehouse {
    DuckDb(DuckDbWarehouse),
    Postgres(PostgresWarehouse),
    Snowflake(SnowflakeWarehouse),
}

/// What a run's profile points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    DuckDb(DuckDbTarget),
    Schema(SchemaTarget),
}

/// Which output of the profile a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `prod`: a deploy into production.
    Deploy,
    /// `ci`: a PR's build into its isolation.
    Ci,
    /// `ci`: a teardown of a PR's isolation.
    Teardown,
}

/// A schema of a server warehouse: where dbt's models go unless they name a custom schema
/// (then `<schema>_<custom>`, by dbt's default `generate_schema_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaTarget {
    pub purpose: Purpose,
    pub database: String,
    pub schema: String,
    /// Names the run in every session dbt opens (PostgreSQL's `application_name`), so the
    /// warehouse's own views tell whose queries these are: `slimci <run id> <repository> pr <n>`.
    pub session_label: String,
    /// The same for Snowflake's `query_tag`, as JSON: `{"app":"slimci","repo":…,"pr":…,
    /// "run_id":…,"attempt":…,"sha":…}` (`pr` null for a deploy).
    pub query_tag: String,
    /// Snowflake's role and warehouse for this repository, when it sets them (else the
    /// agent's).
    pub role: Option<String>,
    pub compute: Option<String>,
}

fn query_tag(job: &CheckedJob) -> String {
    let pr = match &job.kind {
        JobKind::Ci { pr, .. } | JobKind::Teardown { pr, .. } => Some(pr.0),
        JobKind::Deploy => None,
    };
    serde_json::json!({
        "app": "slimci",
        "repo": job.repository.as_str(),
        "pr": pr,
        "run_id": job.run_id.to_string(),
        "attempt": job.attempt.0,
        "sha": job.git.sha.as_ref().map(|sha| sha.as_str()),
    })
    .to_string()
}

/// `slimci <run id> <repository> pr <n>` (or `deploy`), at most 63 bytes (PostgreSQL's limit
/// for `application_name`): the run id first, so a long repository name is what is cut.
fn session_label(job: &CheckedJob) -> String {
    let what = match &job.kind {
        JobKind::Ci { pr, .. } | JobKind::Teardown { pr, .. } => format!("pr {pr}"),
        JobKind::Deploy => "deploy".to_owned(),
    };
    let mut label = format!("slimci {} {} {what}", job.run_id, job.repository);
    while label.len() > 63 {
        label.pop();
    }
    label
}

impl Target {
    pub fn is_deploy(&self) -> bool {
        match self {
            Target::DuckDb(target) => matches!(target, DuckDbTarget::Deploy { .. }),
            Target::Schema(target) => target.purpose == Purpose::Deploy,
        }
    }

    /// The profile's output name: `prod` for a deploy, `ci` otherwise.
    pub fn name(&self) -> &'static str {
        if self.is_deploy() { "prod" } else { "ci" }
    }

    /// For the run's log: where this build writes.
    pub fn describe(&self) -> String {
        match self {
            Target::DuckDb(DuckDbTarget::Deploy { database }) => {
                format!("building production into a copy at {}", database.display())
            }
            Target::DuckDb(
                DuckDbTarget::Ci { database, .. } | DuckDbTarget::Teardown { database },
            ) => format!("building into the PR's own database {}", database.display()),
            Target::Schema(SchemaTarget {
                purpose: Purpose::Deploy,
                database,
                schema,
                ..
            }) => format!("building production into {database}.{schema}"),
            Target::Schema(SchemaTarget {
                database, schema, ..
            }) => format!(
                "building into the PR's schemas {database}.{schema} and {database}.{schema}_*"
            ),
        }
    }
}

impl Warehouse {
    /// The type's name as configured.
    pub fn type_name(&self) -> &'static str {
        match self {
            Warehouse::DuckDb(_) => "duckdb",
            Warehouse::Postgres(_) => "postgres",
            Warehouse::Snowflake(_) => "snowflake",
        }
    }

    /// The target of `job`: a deploy's copy of production (DuckDB) or production itself, the
    /// PR's own database or schema.
    pub fn target(&self, job: &CheckedJob) -> Result<Target, WarehouseError> {
        let repository = &job.repository;
        match self {
            Warehouse::DuckDb(warehouse) => Ok(Target::DuckDb(match &job.kind {
                JobKind::Deploy => warehouse.begin_deploy(repository, job.run_id)?,
                JobKind::Teardown { isolation, .. } => warehouse
                    .teardown_target(repository, isolation)
                    .ok_or_else(|| WarehouseError::NoIsolation(isolation.clone()))?,
                JobKind::Ci {
                    isolation,
                    production_state,
                    ..
                } => warehouse.ci_target(repository, isolation, production_state.deploy_run_id)?,
            })),
            Warehouse::Postgres(_) | Warehouse::Snowflake(_) => {
                let settings = job.warehouse.as_ref().ok_or_else(|| {
                    WarehouseError::NoRepositorySettings(repository.to_string(), self.type_name())
                })?;
                let (purpose, database, schema) = match &job.kind {
                    JobKind::Deploy => (
                        Purpose::Deploy,
                        settings.database.clone(),
                        settings.schema.clone(),
                    ),
                    JobKind::Ci { isolation, .. } => (
                        Purpose::Ci,
                        settings.ci_database().to_owned(),
                        isolation.to_string(),
                    ),
                    JobKind::Teardown { isolation, .. } => (
                        Purpose::Teardown,
                        settings.ci_database().to_owned(),
                        isolation.to_string(),
                    ),
                };
                Ok(Target::Schema(SchemaTarget {
                    purpose,
                    database,
                    schema,
                    session_label: session_label(job),
                    query_tag: query_tag(job),
                    role: settings.role.clone(),
                    compute: settings.warehouse.clone(),
                }))
            }
        }
    }

    /// The `profiles.yml` text for `profile_name` with the one output `target` needs. `up`
    /// leads from the project directory back to the run directory (DuckDB's links).
    pub fn profile_yaml(&self, profile_name: &str, target: &Target, up: &str) -> String {
        let output = match (self, target) {
            (Warehouse::DuckDb(warehouse), Target::DuckDb(target)) => {
                warehouse.profile_output(target, up)
            }
            (Warehouse::Postgres(warehouse), Target::Schema(target)) => {
                warehouse.profile_output(target)
            }
            (Warehouse::Snowflake(warehouse), Target::Schema(target)) => {
                warehouse.profile_output(target, up)
            }
            _ => unreachable!("a target always comes from its own warehouse"),
        };
        let name = target.name();
        let profile = serde_json::json!({
            profile_name: { "target": name, "outputs": { name: output } }
        });
        serde_yaml::to_string(&profile).expect("profile serializes")
    }

    /// Makes a successful deploy production (DuckDB swaps its copy in; a server warehouse
    /// built production in place).
    pub fn publish_deploy(&self, repository: &RepoName, run: RunId) -> Result<(), WarehouseError> {
        match self {
            Warehouse::DuckDb(warehouse) => warehouse.publish_deploy(repository, run),
            Warehouse::Postgres(_) | Warehouse::Snowflake(_) => Ok(()),
        }
    }

    /// Removes a deploy's copy that will not become production (DuckDB).
    pub fn discard_deploy(&self, repository: &RepoName, run: RunId) {
        if let Warehouse::DuckDb(warehouse) = self {
            warehouse.discard_deploy(repository, run);
        }
    }

    /// The longest schema name this warehouse keeps whole: PostgreSQL cuts identifiers at 63
    /// bytes, Snowflake allows 255.
    pub fn max_identifier(&self) -> Option<usize> {
        match self {
            Warehouse::Postgres(_) => Some(63),
            Warehouse::Snowflake(_) => Some(255),
            Warehouse::DuckDb(_) => None,
        }
    }

    /// Variables dbt needs in its environment for this warehouse (besides secrets).
    pub fn dbt_env(&self) -> Vec<(String, String)> {
        match self {
            // The connector otherwise probes cloud metadata endpoints at every login, which a
            // runner in a private subnet may not answer.
            Warehouse::Snowflake(_) => vec![(
                "SNOWFLAKE_DISABLE_PLATFORM_DETECTION".to_owned(),
                "true".to_owned(),
            )],
            Warehouse::DuckDb(_) | Warehouse::Postgres(_) => Vec::new(),
        }
    }

    /// The warehouse's name in messages.
    pub fn display_name(&self) -> &'static str {
        match self {
            Warehouse::DuckDb(_) => "DuckDB",
            Warehouse::Postgres(_) => "PostgreSQL",
            Warehouse::Snowflake(_) => "Snowflake",
        }
    }

    /// Whether builds reach the warehouse over the network (PostgreSQL, Snowflake), so the
    /// first connection is checked before parsing.
    pub fn is_server(&self) -> bool {
        !matches!(self, Warehouse::DuckDb(_))
    }

    /// The agent's own settings to check when the warehouse refuses a connection; none for
    /// DuckDB.
    pub fn connection_settings(&self) -> Option<&'static str> {
        match self {
            Warehouse::Postgres(_) => Some(
                "check this agent's [warehouse] host, port, user, password and sslmode, and that the user may connect to the repository's database",
            ),
            Warehouse::Snowflake(_) => Some(
                "check this agent's [warehouse] account, user, role, warehouse and private_key_path (or password), and the user's grants",
            ),
            Warehouse::DuckDb(_) => None,
        }
    }

    /// What to check when dbt's `error` says it could not connect or log in: the agent's own
    /// settings for this warehouse. None for other errors, and for DuckDB.
    pub fn connection_hint(&self, error: &str) -> Option<String> {
        const CONNECTION: [&str; 9] = [
            "could not connect",
            "connection to server",
            "could not translate host name",
            "password authentication failed",
            "Failed to connect to DB",
            "Incorrect username or password",
            "JWT token is invalid",
            "role \"",
            "does not exist or not authorized",
        ];
        if !CONNECTION.iter().any(|needle| error.contains(needle)) {
            return None;
        }
        self.connection_settings()
            .map(|settings| format!("the warehouse refused the connection: {settings}"))
    }

    /// Whether a build gets the private key as a file of its own (`KEY_FILE`).
    pub fn needs_key_file(&self) -> bool {
        matches!(
            self,
            Warehouse::Snowflake(SnowflakeWarehouse {
                auth: SnowflakeAuth::KeyPair { .. },
                ..
            })
        )
    }

    /// Whether one PR's parse can serve another's: only where every PR gets the same profile.
    pub fn ci_parse_carries_over(&self) -> bool {
        matches!(self, Warehouse::DuckDb(_))
    }

    /// The CI target a deploy parses production's code for, so CI builds can start from that
    /// parse; none where a PR's profile differs from every other PR's (a server warehouse's PR
    /// schema is in the profile, and in every parsed node), so no parse carries over.
    pub fn seed_target(&self, run_dir: &Path, deploy: &Target) -> Option<Target> {
        match (self, deploy) {
            (Warehouse::DuckDb(_), Target::DuckDb(deploy)) => Some(Target::DuckDb(
                DuckDbWarehouse::seed_target(run_dir, deploy),
            )),
            _ => None,
        }
    }

    /// Whether the PR's isolation may hold anything here (a server's schemas always may).
    pub fn may_hold(&self, repository: &RepoName, isolation: &IsolationName) -> bool {
        match self {
            Warehouse::DuckDb(warehouse) => warehouse.pr_database(repository, isolation).is_some(),
            Warehouse::Postgres(_) | Warehouse::Snowflake(_) => true,
        }
    }

    /// The arguments of the teardown macro (`job/teardown.sql`) for `isolation`.
    pub fn teardown_args(&self, isolation: &IsolationName) -> serde_json::Value {
        match self {
            Warehouse::DuckDb(_) => serde_json::json!({
                "name": isolation.as_str(), "strategy": "database", "database": PR_CATALOG,
            }),
            Warehouse::Postgres(_) | Warehouse::Snowflake(_) => serde_json::json!({
                "name": isolation.as_str(), "strategy": "schemas",
            }),
        }
    }

    /// After a teardown's macro ran: removes what is left on disk (DuckDB's PR directory).
    pub fn remove_isolation(
        &self,
        repository: &RepoName,
        isolation: &IsolationName,
    ) -> Result<(), WarehouseError> {
        match self {
            Warehouse::DuckDb(warehouse) => warehouse.remove_pr_database(repository, isolation),
            Warehouse::Postgres(_) | Warehouse::Snowflake(_) => Ok(()),
        }
    }
}

/// The directory a DuckDB build may write: the deploy's own, or the PR's own. None for a
/// server warehouse, where builds write over the network only.
pub fn writable_dir(target: &Target) -> Option<&Path> {
    match target {
        Target::DuckDb(target) => Some(DuckDbWarehouse::writable_dir(target)),
        Target::Schema(_) => None,
    }
}

/// The environment variables a profile reads with `env_var('...')`, in any of its values.
pub fn referenced_variables(profile: &str) -> Vec<String> {
    fn strings(value: &serde_yaml::Value, out: &mut Vec<String>) {
        match value {
            serde_yaml::Value::String(text) => out.push(text.clone()),
            serde_yaml::Value::Sequence(items) => items.iter().for_each(|v| strings(v, out)),
            serde_yaml::Value::Mapping(map) => map.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut texts = Vec::new();
    match serde_yaml::from_str::<serde_yaml::Value>(profile) {
        Ok(parsed) => strings(&parsed, &mut texts),
        Err(_) => texts.push(profile.to_owned()),
    }
    let mut names: Vec<String> = texts
        .iter()
        .flat_map(|text| text.split("env_var(").skip(1))
        .filter_map(|rest| {
            let rest = rest.trim_start();
            let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            let rest = &rest[1..];
            Some(rest[..rest.find(quote)?].to_owned())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
