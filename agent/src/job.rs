//! One attempt of one run, from checkout to the final report.
//!
//! Phases: checkout (git cache → fresh directory), state fetch (CI only), deps (only when the
//! project has packages), profile, build, upload. Each is reported with its timing; the first
//! that fails ends the attempt with a message saying which and why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use slimci_proto::{CacheReport, EventBody, Job, NodeResult, Outcome, Phase, RunKind, RunResult};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, Held};
use crate::config::{Config, Secrets};
use crate::dbtlog::Progress;
use crate::events::Reporter;
use crate::git::GitCache;
use crate::process::{self, Exit, Invocation, Ran};
use crate::redact::Redactor;
use crate::reuse::{self, ParseInputs, RestoredParse};
use crate::sandbox::{BuildPaths, Sandbox};
use crate::state::StateCache;
use crate::warehouse::{DuckDbWarehouse, PR_CATALOG, Target};

/// Log lines are sent at least this often while dbt runs.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// ... or when this many are waiting.
const LOG_BATCH_LINES: usize = 500;
/// Log the agent forwards per attempt; past it one marker line, then nothing.
const MAX_FORWARDED_LOG_BYTES: u64 = 128 * 1024 * 1024;

/// What every job on this agent shares.
pub struct Services {
    pub config: Arc<Config>,
    pub secrets: Secrets,
    pub http: reqwest::Client,
    pub git: Arc<GitCache>,
    pub states: StateCache,
    /// The disk caches, for holds and eviction.
    pub cache: Arc<Cache>,
    /// The installed dbt's identity, part of every parse and packages key.
    pub dbt_identity: String,
    pub warehouse: Arc<DuckDbWarehouse>,
    pub sandbox: Arc<Sandbox>,
    /// Pre-started dbt for the slots' next builds, when dbt is a Python script here.
    pub warm: Option<Arc<crate::warm::WarmPool>>,
}

/// A failed step: the result to report and a message for people.
struct Stop {
    result: RunResult,
    message: String,
}

impl Stop {
    fn error(message: impl Into<String>) -> Stop {
        Stop {
            result: RunResult::Error,
            message: message.into(),
        }
    }
}

/// Buffers log lines, redacts secrets, and sends them in numbered batches.
struct LogSender<'a> {
    reporter: &'a Reporter,
    redactor: Redactor,
    pending: Vec<String>,
    next_line: u64,
    bytes: u64,
    truncated: bool,
}

impl<'a> LogSender<'a> {
    fn new(reporter: &'a Reporter, redactor: Redactor) -> Self {
        LogSender {
            reporter,
            redactor,
            pending: Vec::new(),
            next_line: 0,
            bytes: 0,
            truncated: false,
        }
    }

    fn line(&mut self, text: String) {
        for line in self.redactor.line(text) {
            self.push(line);
        }
    }

    /// Sends what is pending, and the lines the redactor held back: the output has ended.
    fn finish(&mut self) {
        for line in self.redactor.finish() {
            self.push(line);
        }
        self.flush();
    }

    fn push(&mut self, text: String) {
        if self.truncated {
            return;
        }
        self.bytes += text.len() as u64 + 1;
        if self.bytes > MAX_FORWARDED_LOG_BYTES {
            self.truncated = true;
            self.pending.push(
                "[slimci] the build printed more log than the agent forwards; the rest is dropped"
                    .to_owned(),
            );
        } else {
            self.pending.push(text);
        }
        if self.pending.len() >= LOG_BATCH_LINES {
            self.flush();
        }
    }

    fn slimci(&mut self, text: impl std::fmt::Display) {
        let time = chrono::Utc::now().format("%H:%M:%S");
        self.line(format!("{time}  [slimci] {text}"));
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.pending);
        let first_line = self.next_line;
        self.next_line += lines.len() as u64;
        self.reporter.send(EventBody::Log { first_line, lines });
    }
}

struct Attempt<'a> {
    services: &'a Services,
    job: &'a Job,
    reporter: &'a Reporter,
    cancel: &'a CancellationToken,
    log: LogSender<'a>,
    run_dir: PathBuf,
    deadline: Instant,
    /// Paths the build may use besides the run directory.
    paths: BuildPaths,
    /// `DBT_ENV_SECRET_*` variables the profile reads, with their values.
    profile_secrets: Vec<(String, String)>,
    invocations: u32,
    last_report: Option<slimci_proto::SandboxReport>,
    /// A limit the build hit without being stopped by it, for the run's message.
    limit_note: Option<String>,
    /// Which caches the attempt used, reported once the build has run.
    caches: CacheReport,
    /// Cache entries this attempt reads; eviction leaves them alone until it ends.
    holds: Vec<Held>,
    /// The profile written for this attempt.
    profile: String,
    /// The last dbt invocation: when it was spawned, loaded, and done parsing.
    last_timing: (
        Option<std::time::Instant>,
        Option<std::time::Instant>,
        Option<std::time::Instant>,
    ),
}

/// Runs the job and returns how it ended. Never panics on bad input; every failure becomes an
/// outcome with a message.
pub async fn execute(
    services: &Services,
    job: &Job,
    reporter: &Reporter,
    cancel: &CancellationToken,
) -> Outcome {
    let run_dir = services
        .config
        .work_dir
        .join("runs")
        .join(format!("{}-{}", job.run_id, job.attempt));
    let mut attempt = Attempt {
        services,
        job,
        reporter,
        cancel,
        log: LogSender::new(reporter, Redactor::new(services.secrets.redacted_values())),
        run_dir,
        deadline: Instant::now() + Duration::from_secs(job.timeout_secs),
        paths: BuildPaths::default(),
        profile_secrets: Vec::new(),
        invocations: 0,
        last_report: None,
        limit_note: None,
        caches: CacheReport::default(),
        holds: Vec::new(),
        profile: String::new(),
        last_timing: (None, None, None),
    };
    let mut outcome = match attempt.run().await {
        Ok(outcome) => outcome,
        Err(stop) => {
            attempt.log.slimci(&stop.message);
            Outcome {
                result: stop.result,
                message: Some(stop.message),
                dbt_exit_code: None,
                nodes: Vec::new(),
                deferred: Vec::new(),
            }
        }
    };
    attempt.log.finish();
    // Messages are stored and shown like the log: no secret in them either.
    let redactor = &attempt.log.redactor;
    outcome.message = outcome.message.map(|message| redactor.redact(&message));
    for node in &mut outcome.nodes {
        node.message = node
            .message
            .as_deref()
            .map(|message| redactor.redact(message));
    }
    if let Err(error) = std::fs::remove_dir_all(&attempt.run_dir)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, dir = %attempt.run_dir.display(), "could not remove the run directory");
    }
    attempt.holds.clear();
    if let Some(pool) = &services.warm {
        let (pool, sandbox) = (pool.clone(), services.sandbox.clone());
        tokio::spawn(async move { pool.replenish(&sandbox).await });
    }
    let cache = services.cache.clone();
    tokio::task::spawn_blocking(move || {
        let evicted = cache.evict();
        if !evicted.removed.is_empty() || evicted.busy > 0 {
            tracing::info!(
                removed = ?evicted.removed,
                freed_bytes = evicted.removed_bytes,
                busy = evicted.busy,
                total_bytes = evicted.total_bytes,
                "cache: evicted least recently used entries"
            );
        }
    });
    outcome
}

/// Runs blocking cache I/O off the async threads; a task that panicked is an I/O error too.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| Err(std::io::Error::other(error)))
}

/// From a project directory (`src/<project_dir>`) back up to its run directory: `../`, or
/// `../../../` for a project in `analytics/dbt`.
fn up_to_run_dir(project_dir: &str) -> String {
    let depth = Path::new(project_dir)
        .components()
        .filter(|part| matches!(part, std::path::Component::Normal(_)))
        .count();
    "../".repeat(depth + 1)
}

#[derive(Deserialize)]
struct RunResults {
    results: Vec<RunResultEntry>,
}

#[derive(Deserialize)]
struct RunResultEntry {
    unique_id: String,
    status: String,
    #[serde(default)]
    execution_time: f64,
    message: Option<String>,
    failures: Option<u64>,
    relation_name: Option<String>,
}

/// Every node's outcome from dbt's `run_results.json`.
pub fn read_run_results(path: &Path) -> Result<Vec<NodeResult>, String> {
    let bytes =
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let results: RunResults = serde_json::from_slice(&bytes)
        .map_err(|error| format!("{} is not dbt run results: {error}", path.display()))?;
    Ok(results
        .results
        .into_iter()
        .map(|entry| NodeResult {
            resource_type: entry
                .unique_id
                .split('.')
                .next()
                .unwrap_or_default()
                .to_owned(),
            unique_id: entry.unique_id,
            status: entry.status,
            execution_time_s: entry.execution_time,
            message: entry.message,
            failures: entry.failures,
            relation: entry.relation_name,
        })
        .collect())
}

#[derive(Deserialize)]
struct Manifest {
    nodes: std::collections::HashMap<String, ManifestNode>,
}

#[derive(Deserialize)]
struct ManifestNode {
    #[serde(default)]
    depends_on: DependsOn,
}

#[derive(Deserialize, Default)]
struct DependsOn {
    #[serde(default)]
    nodes: Vec<String>,
}

/// The parents of the built nodes that were not built themselves: what `--defer` read from
/// production. Sources are not counted; they are the same for every target.
pub fn read_deferred(manifest: &Path, nodes: &[NodeResult]) -> Vec<String> {
    let Ok(bytes) = std::fs::read(manifest) else {
        return Vec::new();
    };
    let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
        return Vec::new();
    };
    let selected: std::collections::HashSet<&str> =
        nodes.iter().map(|node| node.unique_id.as_str()).collect();
    let mut deferred: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for id in &selected {
        let Some(node) = manifest.nodes.get(*id) else {
            continue;
        };
        for parent in &node.depends_on.nodes {
            let buildable = ["model.", "seed.", "snapshot."]
                .iter()
                .any(|prefix| parent.starts_with(prefix));
            if buildable && !selected.contains(parent.as_str()) {
                deferred.insert(parent.clone());
            }
        }
    }
    deferred.into_iter().collect()
}

/// The macro a teardown runs. It refuses any name that is not a PR isolation, and with the
/// `database` strategy (one database per PR, as with DuckDB) refuses unless the target database
/// is the one named (the agent links the PR's own database under that name); with `schema` (one
/// schema per PR) it drops only that schema.
const DROP_ISOLATION_MACRO: &str = r#"{# Written by slimci for a teardown run; not part of the project. #}
{% macro slimci_drop_isolation(name, strategy, database=none) %}
  {% if not (name is string and name.startswith('pr_') and name | length <= 63) %}
    {{ exceptions.raise_compiler_error("slimci refuses to drop `" ~ name ~ "`: it is not a PR isolation name") }}
  {% endif %}
  {% if strategy == 'schema' %}
    {% do adapter.drop_schema(api.Relation.create(database=target.database, schema=name)) %}
    {% do adapter.commit() %}
    {{ log("slimci: dropped schema " ~ name ~ " in " ~ target.database, info=True) }}
  {% elif strategy == 'database' %}
    {% if database is none or target.database != database %}
      {{ exceptions.raise_compiler_error("slimci refuses to empty `" ~ target.database ~ "`: it is not the database of the isolation `" ~ name ~ "`") }}
    {% endif %}
    {% set dropped = [] %}
    {% for row in list_schemas(target.database) %}
      {% set schema = row[0] %}
      {% if schema | lower not in ['information_schema', 'pg_catalog'] %}
        {% for found in list_relations_without_caching(api.Relation.create(database=target.database, schema=schema)) %}
          {% set relation = api.Relation.create(database=found[0], schema=found[2], identifier=found[1], type=found[3]) %}
          {% do adapter.drop_relation(relation) %}
          {% do dropped.append(schema ~ '.' ~ found[1]) %}
        {% endfor %}
      {% endif %}
    {% endfor %}
    {% do adapter.commit() %}
    {{ log("slimci: dropped " ~ (dropped | length) ~ " relations of " ~ name ~ ": " ~ (dropped | join(", ")), info=True) }}
  {% else %}
    {{ exceptions.raise_compiler_error("slimci_drop_isolation: unknown strategy " ~ strategy) }}
  {% endif %}
{% endmacro %}
"#;

/// The project's first macro directory (`macro-paths`, default `macros`).
fn first_macro_path(project_file: &Path) -> String {
    std::fs::read_to_string(project_file)
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|project| {
            project
                .get("macro-paths")?
                .as_sequence()?
                .first()?
                .as_str()
                .map(str::to_owned)
        })
        .filter(|path| !path.starts_with('/') && !path.split('/').any(|part| part == ".."))
        .unwrap_or_else(|| "macros".to_owned())
}

fn profile_name(project_file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(project_file)
        .map_err(|error| format!("cannot read dbt_project.yml: {error}"))?;
    let project: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|error| format!("dbt_project.yml is not valid YAML: {error}"))?;
    project
        .get("profile")
        .and_then(serde_yaml::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            "dbt_project.yml names no `profile`; slimci writes that profile for each run".to_owned()
        })
}

impl Attempt<'_> {
    fn phase_started(&self, phase: Phase) {
        self.reporter.send(EventBody::PhaseStarted { phase });
    }

    fn phase_finished(&mut self, phase: Phase, ok: bool) {
        self.log.flush();
        self.reporter.send(EventBody::PhaseFinished { phase, ok });
    }

    fn check_cancelled(&self) -> Result<(), Stop> {
        if self.cancel.is_cancelled() {
            return Err(Stop {
                result: RunResult::Cancelled,
                message: "cancelled".to_owned(),
            });
        }
        if Instant::now() >= self.deadline {
            return Err(Stop {
                result: RunResult::TimedOut,
                message: format!("exceeded the run timeout of {} s", self.job.timeout_secs),
            });
        }
        Ok(())
    }

    async fn run(&mut self) -> Result<Outcome, Stop> {
        let job = self.job;
        for directory in ["home", "tmp", "profiles", "target", "logs"] {
            let path = self.run_dir.join(directory);
            std::fs::create_dir_all(&path).map_err(|error| {
                Stop::error(format!("cannot create {}: {error}", path.display()))
            })?;
        }

        // Checkout.
        self.phase_started(Phase::Checkout);
        let checkout_result = self.checkout().await;
        self.phase_finished(Phase::Checkout, checkout_result.is_ok());
        let project = checkout_result?;
        self.hand_over(&self.run_dir.clone())?;
        self.paths.write.push(self.run_dir.clone());
        self.check_cancelled()?;

        // Production state (CI only).
        let state_dir = match job.kind {
            RunKind::Deploy | RunKind::Teardown => None,
            RunKind::Ci => {
                self.phase_started(Phase::StateFetch);
                let fetched = self.fetch_state().await;
                self.phase_finished(Phase::StateFetch, fetched.is_ok());
                let fetched = fetched?;
                self.paths.read.push(fetched.clone());
                Some(fetched)
            }
        };
        self.check_cancelled()?;

        // Packages, when the project has any.
        if project.join("packages.yml").is_file() || project.join("dependencies.yml").is_file() {
            self.phase_started(Phase::Deps);
            let deps = self.deps(&project).await;
            self.phase_finished(Phase::Deps, deps.is_ok());
            deps?;
            self.check_cancelled()?;
        }

        if job.kind == RunKind::Teardown {
            return self.teardown(&project).await;
        }

        // Profile.
        self.phase_started(Phase::Profile);
        let profile = self.write_profile(&project);
        self.phase_finished(Phase::Profile, profile.is_ok());
        let target = profile?;

        // Build.
        self.phase_started(Phase::Build);
        let built = self.build(&project, state_dir.as_deref()).await;
        self.phase_finished(
            Phase::Build,
            built
                .as_ref()
                .is_ok_and(|(result, _)| *result == RunResult::Success),
        );
        let (result, dbt_exit_code) = match built {
            Ok(built) => built,
            Err(stop) => {
                self.discard(&target);
                return Err(stop);
            }
        };

        // Upload, then make a successful deploy live.
        self.phase_started(Phase::Upload);
        let uploaded = self.upload().await;
        self.phase_finished(Phase::Upload, uploaded.is_ok());
        let nodes = read_run_results(&self.run_dir.join("target").join("run_results.json"))
            .unwrap_or_else(|error| {
                self.log.slimci(format!("no node results: {error}"));
                Vec::new()
            });
        let deferred = match self.job.kind {
            RunKind::Ci => {
                read_deferred(&self.run_dir.join("target").join("manifest.json"), &nodes)
            }
            RunKind::Deploy | RunKind::Teardown => Vec::new(),
        };
        let mut outcome = Outcome {
            result,
            message: None,
            dbt_exit_code,
            nodes,
            deferred,
        };
        let has_manifest = self.run_dir.join("target").join("manifest.json").is_file();
        match (&target, result, uploaded) {
            (Target::Deploy { .. }, RunResult::Success, Ok(())) if !has_manifest => {
                self.discard(&target);
                return Err(Stop::error(
                    "dbt succeeded but wrote no manifest.json; production was left as it was",
                ));
            }
            (Target::Deploy { .. }, RunResult::Success, Ok(())) => {
                // Production is read by later builds, written by none.
                self.services
                    .sandbox
                    .take_back(DuckDbWarehouse::writable_dir(&target))
                    .map_err(|error| {
                        self.discard(&target);
                        Stop::error(format!("the build succeeded but {error}"))
                    })?;
                self.services
                    .warehouse
                    .publish_deploy(&job.repository, job.run_id)
                    .map_err(|error| {
                        Stop::error(format!(
                            "the build succeeded but could not be made live: {error}"
                        ))
                    })?;
                self.log.slimci("production database swapped in");
            }
            (_, _, Err(stop)) => {
                self.discard(&target);
                return Err(stop);
            }
            _ => self.discard(&target),
        }
        outcome.message = match result {
            RunResult::Success => None,
            RunResult::Failed => Some(failure_summary(&outcome.nodes)),
            _ => Some(format!(
                "dbt exited with code {}",
                dbt_exit_code.unwrap_or(-1)
            )),
        };
        if result != RunResult::Success
            && let (Some(note), Some(message)) = (&self.limit_note, &outcome.message)
        {
            outcome.message = Some(format!("{note}; {message}"));
        }
        Ok(outcome)
    }

    fn discard(&self, target: &Target) {
        if matches!(target, Target::Deploy { .. }) {
            self.services
                .warehouse
                .discard_deploy(&self.job.repository, self.job.run_id);
        }
    }

    async fn checkout(&mut self) -> Result<PathBuf, Stop> {
        let job = self.job.clone();
        let git = self.services.git.clone();
        let source = self.run_dir.join("src");
        let started = std::time::Instant::now();
        let destination = source.clone();
        let checked_out = tokio::task::spawn_blocking(move || {
            let (sha, fetched) = git.prepare(&job.repository, &job.clone_url, &job.git)?;
            let files = git.checkout(&job.repository, &sha, &destination)?;
            Ok::<_, crate::git::GitError>((sha, fetched, files))
        })
        .await
        .map_err(|error| Stop::error(format!("checkout task failed: {error}")))?;
        let (sha, fetched, files) =
            checked_out.map_err(|error| Stop::error(format!("checkout failed: {error}")))?;
        self.caches.git = Some(if fetched { "fetched" } else { "hit" }.to_owned());
        self.reporter.send(EventBody::Started { sha: sha.clone() });
        self.log.slimci(format_args!(
            "checked out {} of {} ({files} files) in {:.2} s",
            sha.short(),
            self.job.repository,
            started.elapsed().as_secs_f64()
        ));
        let project_dir = Path::new(&self.job.project_dir);
        if project_dir.is_absolute()
            || project_dir
                .components()
                .any(|part| matches!(part, std::path::Component::ParentDir))
        {
            return Err(Stop::error(format!(
                "project_dir `{}` must be a path inside the repository",
                self.job.project_dir
            )));
        }
        let project = source.join(project_dir);
        if !project.join("dbt_project.yml").is_file() {
            let location = if self.job.project_dir.is_empty() {
                "the repository root".to_owned()
            } else {
                format!("`{}`", self.job.project_dir)
            };
            return Err(Stop::error(format!(
                "commit {} has no dbt_project.yml in {location}",
                sha.short()
            )));
        }
        Ok(project)
    }

    async fn fetch_state(&mut self) -> Result<PathBuf, Stop> {
        let state = self.job.production_state.as_ref().ok_or_else(|| {
            Stop::error("the job names no production state to compare against; the coordinator should have refused it")
        })?;
        let cached = self
            .services
            .states
            .get(
                &self.services.http,
                &self.services.secrets.coordinator_token,
                state,
            )
            .await
            .map_err(|error| Stop::error(error.to_string()))?;
        self.holds.push(cached.held);
        let (directory, cached) = (cached.directory, cached.hit);
        self.caches.state = Some(if cached { "hit" } else { "downloaded" }.to_owned());
        self.log.slimci(format_args!(
            "comparing against production state of deploy {} (commit {}, manifest sha256 {}){}",
            state.deploy_run_id,
            state.sha.short(),
            &state.manifest_sha256[..12],
            if cached { ", cached" } else { "" }
        ));
        Ok(directory)
    }

    fn write_profile(&mut self, project: &Path) -> Result<Target, Stop> {
        let name = profile_name(&project.join("dbt_project.yml")).map_err(Stop::error)?;
        let warehouse = &self.services.warehouse;
        let target = match self.job.kind {
            RunKind::Deploy => warehouse.begin_deploy(&self.job.repository, self.job.run_id),
            RunKind::Teardown => {
                let isolation = self
                    .job
                    .isolation
                    .as_ref()
                    .ok_or_else(|| Stop::error("a teardown job without an isolation name"))?;
                match warehouse.teardown_target(&self.job.repository, isolation) {
                    Some(target) => Ok(target),
                    None => {
                        return Err(Stop::error(format!(
                            "{isolation} does not exist on this runner"
                        )));
                    }
                }
            }
            RunKind::Ci => {
                let isolation = self
                    .job
                    .isolation
                    .as_ref()
                    .ok_or_else(|| Stop::error("a CI job without a PR isolation name"))?;
                let state = self
                    .job
                    .production_state
                    .as_ref()
                    .ok_or_else(|| Stop::error("a CI job without production state"))?;
                warehouse.ci_target(&self.job.repository, isolation, state.deploy_run_id)
            }
        }
        .map_err(|error| Stop::error(error.to_string()))?;
        let path = self.run_dir.join("profiles").join("profiles.yml");
        let profile = warehouse.profile_yaml(&name, &target, &up_to_run_dir(&self.job.project_dir));
        let prepared = DuckDbWarehouse::link(&self.run_dir, &target)
            .map_err(|error| error.to_string())
            .and_then(|()| {
                std::fs::write(&path, &profile)
                    .map_err(|error| format!("cannot write {}: {error}", path.display()))
            })
            .and_then(|()| {
                self.services
                    .sandbox
                    .hand_over(&path)
                    .and_then(|()| {
                        self.services
                            .sandbox
                            .hand_over(DuckDbWarehouse::writable_dir(&target))
                    })
                    .map_err(|error| error.to_string())
            });
        if let Err(error) = prepared {
            self.discard(&target);
            return Err(Stop::error(error));
        }
        // Only the secrets the profile reads reach dbt.
        let referenced = DuckDbWarehouse::referenced_variables(&profile);
        self.profile_secrets = self
            .services
            .secrets
            .warehouse
            .iter()
            .filter(|secret| referenced.contains(&secret.env_name()))
            .map(|secret| (secret.env_name(), secret.value.clone()))
            .collect();
        self.profile = profile;
        self.paths
            .write
            .push(DuckDbWarehouse::writable_dir(&target).to_owned());
        if let Target::Ci { production, .. } = &target
            && let Some(directory) = production.parent()
        {
            self.paths.read.push(directory.to_owned());
        }
        match &target {
            Target::Deploy { database } => self.log.slimci(format_args!(
                "building production into a copy at {}",
                database.display()
            )),
            Target::Ci { database, .. } | Target::Teardown { database } => self.log.slimci(
                format_args!("building into the PR's own database {}", database.display()),
            ),
        }
        Ok(target)
    }

    /// Drops the PR's isolation through dbt (`run-operation` with a macro slimci supplies, so it
    /// works on every adapter), then removes what is left of it on disk. `Job::check` already
    /// made sure the isolation is this repository's and this PR's.
    async fn teardown(&mut self, project: &Path) -> Result<Outcome, Stop> {
        let isolation = self
            .job
            .isolation
            .clone()
            .ok_or_else(|| Stop::error("a teardown job without an isolation name"))?;
        let warehouse = self.services.warehouse.clone();
        if warehouse
            .pr_database(&self.job.repository, &isolation)
            .is_none()
        {
            self.log.slimci(format_args!(
                "{isolation} does not exist on this runner; nothing to drop"
            ));
            return Ok(Outcome {
                result: RunResult::Success,
                message: Some(format!("{isolation}: nothing to drop")),
                dbt_exit_code: None,
                nodes: Vec::new(),
                deferred: Vec::new(),
            });
        }
        self.phase_started(Phase::Profile);
        let prepared = self.write_profile(project).and_then(|target| {
            let macros = project.join(first_macro_path(&project.join("dbt_project.yml")));
            let file = macros.join("slimci_drop_isolation.sql");
            std::fs::create_dir_all(&macros)
                .and_then(|()| std::fs::write(&file, DROP_ISOLATION_MACRO))
                .map_err(|error| {
                    Stop::error(format!("cannot write the teardown macro: {error}"))
                })?;
            self.hand_over(&macros)?;
            self.hand_over(&file)?;
            Ok(target)
        });
        self.phase_finished(Phase::Profile, prepared.is_ok());
        let target = prepared?;

        self.phase_started(Phase::Build);
        let args = vec![
            "run-operation".to_owned(),
            "slimci_drop_isolation".to_owned(),
            "--args".to_owned(),
            serde_json::json!({ "name": isolation.as_str(), "strategy": "database", "database": PR_CATALOG })
                .to_string(),
            "--target".to_owned(),
            "ci".to_owned(),
            "--log-format".to_owned(),
            "json".to_owned(),
        ];
        self.log.slimci(format_args!("dbt {}", args.join(" ")));
        let ran = self.dbt(project, args).await;
        let dropped = matches!(&ran, Ok(ran) if ran.exit == Exit::Code(0));
        self.phase_finished(Phase::Build, dropped);
        let ran = ran?;
        if ran.exit != Exit::Code(0) {
            return Err(self.stop_for(&ran, "dbt run-operation slimci_drop_isolation"));
        }
        let _ = self
            .services
            .sandbox
            .take_back(DuckDbWarehouse::writable_dir(&target));
        warehouse
            .remove_pr_database(&self.job.repository, &isolation)
            .map_err(|error| {
                Stop::error(format!(
                    "dropped the relations but could not remove the database: {error}"
                ))
            })?;
        self.log.slimci(format_args!("dropped {isolation}"));
        Ok(Outcome {
            result: RunResult::Success,
            message: Some(format!("dropped {isolation}")),
            dbt_exit_code: Some(0),
            nodes: Vec::new(),
            deferred: Vec::new(),
        })
    }

    fn hand_over(&self, path: &Path) -> Result<(), Stop> {
        self.services
            .sandbox
            .hand_over(path)
            .map_err(|error| Stop::error(error.to_string()))
    }

    /// dbt's whole environment: an allowlist, and the secrets the profile reads.
    fn dbt_env(&self) -> Vec<(String, String)> {
        let run = |name: &str| self.run_dir.join(name).display().to_string();
        let dbt_bin = self
            .services
            .config
            .dbt
            .parent()
            .map(|dir| format!("{}:", dir.display()))
            .unwrap_or_default();
        vec![
            (
                "PATH".into(),
                format!("{dbt_bin}/usr/local/bin:/usr/bin:/bin"),
            ),
            ("HOME".into(), run("home")),
            ("TMPDIR".into(), run("tmp")),
            ("LANG".into(), "C.UTF-8".into()),
            ("LC_ALL".into(), "C.UTF-8".into()),
            ("PYTHONUNBUFFERED".into(), "1".into()),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
            ("DBT_SEND_ANONYMOUS_USAGE_STATS".into(), "false".into()),
            ("DBT_USE_COLORS".into(), "false".into()),
            ("DBT_PROFILES_DIR".into(), run("profiles")),
            ("DBT_TARGET_PATH".into(), run("target")),
            ("DBT_LOG_PATH".into(), run("logs")),
        ]
        .into_iter()
        .chain(self.profile_secrets.iter().cloned())
        .collect()
    }

    /// Runs dbt with `args` in the sandbox and streams its output; returns how it ended.
    async fn dbt(&mut self, project: &Path, args: Vec<String>) -> Result<Ran, Stop> {
        self.run_dbt(project, args, false).await
    }

    /// As `dbt`, on the slot's pre-started dbt if there is one.
    async fn dbt_prestarted(&mut self, project: &Path, args: Vec<String>) -> Result<Ran, Stop> {
        self.run_dbt(project, args, true).await
    }

    /// Hands the build to a pre-started dbt: its output, its process, and a task that passes
    /// the attempt's cancel and deadline on. None if there is none or it cannot take the job.
    async fn hand_to_warm(
        &mut self,
        project: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Option<(
        mpsc::Receiver<String>,
        tokio::task::JoinHandle<Result<Ran, process::ProcessError>>,
        tokio::task::JoinHandle<()>,
    )> {
        let warm = self.services.warm.as_ref()?.take()?;
        let job = serde_json::json!({
            "args": args,
            "cwd": project,
            "env": env,
            "landlock": self.services.sandbox.landlock_rules(&self.paths),
        });
        if let Err(error) = warm.hand(&job).await {
            self.log.slimci(format_args!("starting dbt cold: {error}"));
            warm.discard();
            return None;
        }
        let crate::warm::Warm {
            lines,
            task,
            stop,
            timeout,
            ..
        } = warm;
        let (cancel, deadline) = (self.cancel.clone(), self.deadline);
        let linker = tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => stop.cancel(),
                () = tokio::time::sleep_until(deadline) => timeout.cancel(),
            }
        });
        Some((lines, task, linker))
    }

    /// Starts dbt in the sandbox; returns its output and its process.
    #[allow(clippy::type_complexity)]
    fn spawn_dbt(
        &self,
        project: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<
        (
            mpsc::Receiver<String>,
            tokio::task::JoinHandle<Result<Ran, process::ProcessError>>,
        ),
        Stop,
    > {
        let program = self.services.config.dbt.clone();
        let name = format!(
            "{}-{}-{}",
            self.job.run_id, self.job.attempt, self.invocations
        );
        let prepared = self
            .services
            .sandbox
            .prepare(&name, &program, &args, project, &env, &self.paths)
            .map_err(|error| Stop::error(error.to_string()))?;
        let invocation = Invocation {
            program,
            args,
            cwd: project.to_owned(),
            env,
            deadline: self.deadline,
            timeout: None,
            grace: Duration::from_secs(self.services.config.grace_secs()),
            sandbox: Some(prepared),
        };
        let (lines, incoming) = mpsc::channel(4096);
        let cancel = self.cancel.clone();
        let running = tokio::spawn(async move { process::run(invocation, lines, &cancel).await });
        Ok((incoming, running))
    }

    async fn run_dbt(
        &mut self,
        project: &Path,
        args: Vec<String>,
        prestarted: bool,
    ) -> Result<Ran, Stop> {
        self.invocations += 1;
        let env = self.dbt_env();
        let spawned = std::time::Instant::now();
        let warm = if prestarted {
            self.hand_to_warm(project, &args, &env).await
        } else {
            None
        };
        let (mut incoming, running, linker, prestarted) = match warm {
            Some((lines, task, linker)) => (lines, task, Some(linker), true),
            None => {
                let (incoming, running) = self.spawn_dbt(project, args, env)?;
                (incoming, running, None, false)
            }
        };
        let mut confined = false;
        let mut progress = Progress::default();
        let mut ticker = tokio::time::interval(LOG_FLUSH_INTERVAL);
        let mut progress_dirty = false;
        loop {
            tokio::select! {
                line = incoming.recv() => match line {
                    Some(raw) if prestarted && !confined && raw.starts_with("[slimci-worker] {") => {
                        confined = true;
                    }
                    Some(raw) => {
                        let parsed = progress.read(&raw);
                        progress_dirty |= parsed.progress_changed;
                        if let Some(text) = parsed.text {
                            self.log.line(text);
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    self.log.flush();
                    if progress_dirty {
                        self.reporter.send(EventBody::Progress { done: progress.done, total: progress.total });
                        progress_dirty = false;
                    }
                }
            }
        }
        self.log.flush();
        self.last_timing = (Some(spawned), progress.started, progress.parsed);
        if progress_dirty {
            self.reporter.send(EventBody::Progress {
                done: progress.done,
                total: progress.total,
            });
        }
        let mut ran = running
            .await
            .map_err(|error| Stop::error(format!("build task failed: {error}")))?
            .map_err(|error| Stop::error(error.to_string()))?;
        if let Some(linker) = linker {
            linker.abort();
        }
        if let Some(report) = &mut ran.report {
            report.prestarted = confined;
        }
        if let Some(report) = &ran.report
            && self.last_report.as_ref() != Some(report)
        {
            if self.last_report.is_none() {
                for warning in &report.warnings {
                    self.log.slimci(format_args!("sandbox: {warning}"));
                }
            }
            self.reporter.send(EventBody::Sandbox(report.clone()));
            self.last_report = Some(report.clone());
        }
        if let Some(error) = &ran.sandbox_error {
            return Err(Stop::error(format!(
                "the sandbox did not start dbt: {error}"
            )));
        }
        if ran.pids_limit_hits > 0 {
            self.log.slimci(pids_limit_note(&ran));
        }
        Ok(ran)
    }

    fn stop_for(&self, ran: &Ran, what: &str) -> Stop {
        let mut stop = self.stop_without_note(ran, what);
        if ran.pids_limit_hits > 0 {
            stop.message = format!("{}; {}", stop.message, pids_limit_note(ran));
        }
        stop
    }

    fn stop_without_note(&self, ran: &Ran, what: &str) -> Stop {
        match ran.exit {
            Exit::TimedOut => Stop {
                result: RunResult::TimedOut,
                message: format!(
                    "exceeded the run timeout of {} s during {what}",
                    self.job.timeout_secs
                ),
            },
            Exit::Cancelled => Stop {
                result: RunResult::Cancelled,
                message: format!("cancelled during {what}"),
            },
            _ if ran.oom_kills > 0 => Stop::error(memory_limit_message(ran, what)),
            Exit::Signal(signal) => Stop::error(format!("{what} was killed by signal {signal}")),
            Exit::Code(code) => Stop::error(format!("{what} failed with exit code {code}")),
        }
    }

    /// Installs the project's packages: restored from the cache when the package files are
    /// unchanged, otherwise by `dbt deps`, whose result is then cached.
    async fn deps(&mut self, project: &Path) -> Result<(), Stop> {
        let cacheable = self.services.config.cache.deps;
        let install = reuse::packages_install_path(project);
        let key = reuse::deps_key(&self.services.dbt_identity, project);
        if cacheable && let Some(install) = &install {
            let cache = self.services.cache.clone();
            let (restore_key, project_dir, install_dir) =
                (key.clone(), project.to_owned(), install.clone());
            let restored = blocking(move || {
                reuse::restore_deps(&cache, &restore_key, &project_dir, &install_dir)
            })
            .await;
            match restored {
                Ok(true) => {
                    self.hand_over(&project.join(install))?;
                    if project.join("package-lock.yml").is_file() {
                        self.hand_over(&project.join("package-lock.yml"))?;
                    }
                    self.log.slimci(format_args!(
                        "packages restored from the cache (package files' digest {})",
                        &key[..12]
                    ));
                    self.caches.deps = Some("hit".to_owned());
                    return Ok(());
                }
                Ok(false) => {}
                Err(error) => self.log.slimci(format_args!(
                    "packages cache unusable ({error}); running dbt deps"
                )),
            }
        }
        let ran = self
            .dbt(
                project,
                vec!["deps".into(), "--log-format".into(), "json".into()],
            )
            .await?;
        if ran.exit != Exit::Code(0) {
            return Err(self.stop_for(&ran, "dbt deps"));
        }
        self.caches.deps = Some("installed".to_owned());
        if cacheable && let Some(install) = install {
            let cache = self.services.cache.clone();
            let project_dir = project.to_owned();
            let saved = blocking(move || reuse::save_deps(&cache, &key, &project_dir, &install))
                .await
                .unwrap_or_else(|error| Some(error.to_string()));
            if let Some(reason) = saved {
                self.log
                    .slimci(format_args!("packages not cached: {reason}"));
            }
        }
        Ok(())
    }

    async fn build(
        &mut self,
        project: &Path,
        state_dir: Option<&Path>,
    ) -> Result<(RunResult, Option<i32>), Stop> {
        let mut args: Vec<String> = vec!["build".into()];
        match state_dir {
            Some(state) => {
                args.extend(
                    ["--select", "state:modified+", "--defer", "--state"].map(String::from),
                );
                args.push(state.display().to_string());
                args.extend(["--target".into(), "ci".into()]);
            }
            None => args.extend(["--target".into(), "prod".into()]),
        }
        args.extend(["--log-format".into(), "json".into()]);
        let target_name = if state_dir.is_some() { "ci" } else { "prod" };
        let parse = self.restore_parse(project, target_name).await;
        self.log.slimci(format_args!("dbt {}", args.join(" ")));
        let ran = self.dbt_prestarted(project, args).await?;
        self.after_parse(parse, &ran).await;
        match ran.exit {
            Exit::Code(0) => Ok((RunResult::Success, Some(0))),
            Exit::Code(code) if ran.oom_kills == 0 => {
                if ran.pids_limit_hits > 0 {
                    self.limit_note = Some(pids_limit_note(&ran));
                }
                Ok((RunResult::from_dbt_exit_code(code), Some(code)))
            }
            _ => Err(self.stop_for(&ran, "dbt build")),
        }
    }

    /// Puts the saved parse for this attempt's parse key into its target directory.
    async fn restore_parse(
        &mut self,
        project: &Path,
        target_name: &str,
    ) -> Option<(String, RestoredParse)> {
        if !self.services.config.cache.partial_parse {
            return None;
        }
        let env = self.dbt_env();
        let key = reuse::parse_key(&ParseInputs {
            dbt_identity: &self.services.dbt_identity,
            repository: self.job.repository.as_str(),
            project_dir: &self.job.project_dir,
            target: target_name,
            profile: &self.profile,
            env: &env,
            project,
        });
        let cache = self.services.cache.clone();
        let target_dir = self.run_dir.join("target");
        let restore_key = key.clone();
        let restored =
            blocking(move || reuse::restore_parse(&cache, &restore_key, &target_dir)).await;
        match restored {
            Ok(restored) => {
                if restored.restored {
                    let file = self.run_dir.join("target").join(reuse::PARTIAL_PARSE_FILE);
                    if let Err(stop) = self.hand_over(&file) {
                        self.log
                            .slimci(format_args!("saved parse not used: {}", stop.message));
                        let _ = std::fs::remove_file(&file);
                    } else {
                        self.log.slimci(format_args!(
                            "reusing a saved parse (parse key {})",
                            &key[..12]
                        ));
                    }
                }
                Some((key, restored))
            }
            Err(error) => {
                self.log
                    .slimci(format_args!("parse cache unusable: {error}"));
                None
            }
        }
    }

    /// Records how dbt parsed, saves its new parse for later runs, and reports the caches.
    async fn after_parse(&mut self, parse: Option<(String, RestoredParse)>, ran: &Ran) {
        let (mode, reason) = reuse::parse_mode(&self.run_dir.join("logs").join("dbt.log"));
        let seconds = |from: Option<std::time::Instant>, to: Option<std::time::Instant>| {
            Some(((to? - from?).as_secs_f64() * 1000.0).round() / 1000.0)
        };
        let (spawned, started, parsed) = self.last_timing;
        self.caches.dbt_startup_s = seconds(spawned, started);
        self.caches.parse_s = seconds(started, parsed);
        self.caches.parse = Some(mode.to_owned());
        self.caches.parse_reason = reason;
        // A build dbt finished (pass or fail) wrote a whole parse; a killed one may not have.
        let finished = matches!(ran.exit, Exit::Code(0 | 1)) && ran.oom_kills == 0;
        if let (Some((key, restored)), true) = (parse, finished) {
            let cache = self.services.cache.clone();
            let target_dir = self.run_dir.join("target");
            // `restored` moves in: its hold on the entry lasts until the parse is saved.
            let saved =
                blocking(move || reuse::save_parse(&cache, &key, &target_dir, &restored)).await;
            if let Err(error) = saved {
                self.log.slimci(format_args!("parse not cached: {error}"));
            }
        }
        match &self.caches.parse_reason {
            Some(reason) => self
                .log
                .slimci(format_args!("dbt parsed the whole project: {reason}")),
            None if mode == "partial" => self.log.slimci("dbt reused the saved parse"),
            None => {}
        }
        self.reporter.send(EventBody::Caches(self.caches.clone()));
    }

    async fn upload(&mut self) -> Result<(), Stop> {
        let target = self.run_dir.join("target");
        for name in ["run_results.json", "manifest.json"] {
            let path = target.join(name);
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue;
            };
            let url = format!(
                "{}/api/v1/runs/{}/artifacts/{name}",
                self.services.config.coordinator.url.trim_end_matches('/'),
                self.job.run_id
            );
            let response = self
                .services
                .http
                .put(&url)
                .bearer_auth(&self.services.secrets.coordinator_token)
                .body(bytes)
                .send()
                .await
                .map_err(|error| Stop::error(format!("uploading {name} failed: {error}")))?;
            if !response.status().is_success() {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                return Err(Stop::error(format!(
                    "uploading {name} failed: HTTP {status}: {body}"
                )));
            }
        }
        Ok(())
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

/// The run's message when the kernel killed part of the build for its memory.
fn memory_limit_message(ran: &Ran, what: &str) -> String {
    let limit = ran
        .memory_limit
        .map(|bytes| format!(" of {} MiB", mib(bytes)))
        .unwrap_or_default();
    format!(
        "memory limit: {what} used more than its memory limit{limit}, and the kernel killed {} of its processes (sandbox.memory_limit)",
        ran.oom_kills
    )
}

fn pids_limit_note(ran: &Ran) -> String {
    let limit = ran
        .pids_limit
        .map(|limit| format!(" of {limit} processes"))
        .unwrap_or_default();
    format!(
        "pids limit: the build hit its limit{limit}; {} forks were refused (sandbox.pids_limit)",
        ran.pids_limit_hits
    )
}

/// "2 of 21 nodes failed: test.shop.x (Got 5 results, configured to fail if != 0), ..."
fn failure_summary(nodes: &[NodeResult]) -> String {
    let failed: Vec<&NodeResult> = nodes
        .iter()
        .filter(|node| matches!(node.status.as_str(), "fail" | "error" | "runtime error"))
        .collect();
    if failed.is_empty() {
        return "dbt reported failures".to_owned();
    }
    let names: Vec<String> = failed
        .iter()
        .take(5)
        .map(|node| match &node.message {
            Some(message) => format!(
                "{} ({})",
                node.unique_id,
                message.lines().next().unwrap_or_default()
            ),
            None => node.unique_id.clone(),
        })
        .collect();
    let more = if failed.len() > 5 {
        format!(", and {} more", failed.len() - 5)
    } else {
        String::new()
    };
    format!(
        "{} of {} nodes failed: {}{more}",
        failed.len(),
        nodes.len(),
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_results_become_node_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run_results.json");
        std::fs::write(
            &path,
            r#"{"metadata": {}, "results": [
                {"unique_id": "model.shop.stg_orders", "status": "success", "execution_time": 0.25, "message": "OK", "failures": null, "relation_name": "\"pr_shop_1\".\"main\".\"stg_orders\"", "timing": []},
                {"unique_id": "test.shop.accepted_values_x", "status": "fail", "execution_time": 0.1, "message": "Got 5 results, configured to fail if != 0", "failures": 5}
            ]}"#,
        )
        .unwrap();
        let nodes = read_run_results(&path).unwrap();
        assert_eq!(nodes[0].resource_type, "model");
        assert_eq!(
            nodes[0].relation.as_deref(),
            Some("\"pr_shop_1\".\"main\".\"stg_orders\"")
        );
        assert_eq!(nodes[1].failures, Some(5));
        assert_eq!(
            failure_summary(&nodes),
            "1 of 2 nodes failed: test.shop.accepted_values_x (Got 5 results, configured to fail if != 0)"
        );
    }

    #[test]
    fn the_profile_name_comes_from_the_project() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dbt_project.yml");
        std::fs::write(&path, "name: shop\nprofile: shop_profile\n").unwrap();
        assert_eq!(profile_name(&path).unwrap(), "shop_profile");
        std::fs::write(&path, "name: shop\n").unwrap();
        assert!(
            profile_name(&path)
                .unwrap_err()
                .contains("names no `profile`")
        );
    }
}
