//! All durable state, in SQLite (WAL) through sqlx. Every query the coordinator makes lives in
//! this module, so a PostgreSQL store for HA replaces one file. Logs and artifact bytes live on
//! disk beside the database (see `logs` and `artifacts`); this module holds their metadata.
//!
//! Times are Unix milliseconds (`*_ms`).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use slimci_proto::{
    AgentEvent, Attempt, ClaimRequest, EventBody, IsolationName, Lease, NodeResult, Outcome, Phase,
    PrNumber, RepoName, RunId, RunKind, RunResult, Sha,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use crate::rules::{self, ClaimDecision, ClaimView, EventDisposition, RunStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("the database holds a value this build cannot read: {0}")]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// Ordered schema changes. Append only; never edit a released one.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        repository TEXT NOT NULL,
        kind TEXT NOT NULL,
        pr_number INTEGER,
        sha TEXT,
        fetch_ref TEXT NOT NULL,
        isolation TEXT,
        status TEXT NOT NULL,
        message TEXT,
        attempt INTEGER NOT NULL DEFAULT 1,
        agent TEXT,
        created_ms INTEGER NOT NULL,
        started_ms INTEGER,
        finished_ms INTEGER,
        timeout_secs INTEGER NOT NULL,
        state_run_id TEXT,
        state_sha TEXT,
        state_manifest_sha256 TEXT,
        progress_done INTEGER NOT NULL DEFAULT 0,
        progress_total INTEGER NOT NULL DEFAULT 0,
        last_seq INTEGER NOT NULL DEFAULT 0,
        published INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        dbt_exit_code INTEGER
    );
    CREATE INDEX runs_by_repository ON runs (repository, created_ms);
    CREATE INDEX runs_unpublished ON runs (published, status);
    CREATE TABLE run_phases (
        run_id TEXT NOT NULL REFERENCES runs (id),
        attempt INTEGER NOT NULL,
        phase TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        ok INTEGER,
        PRIMARY KEY (run_id, attempt, phase)
    );
    CREATE TABLE run_nodes (
        run_id TEXT NOT NULL REFERENCES runs (id),
        unique_id TEXT NOT NULL,
        resource_type TEXT NOT NULL,
        status TEXT NOT NULL,
        execution_time_s REAL NOT NULL,
        message TEXT,
        failures INTEGER,
        relation TEXT,
        PRIMARY KEY (run_id, unique_id)
    );
    CREATE TABLE artifacts (
        run_id TEXT NOT NULL REFERENCES runs (id),
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (run_id, name)
    );
    CREATE TABLE production_state (
        repository TEXT PRIMARY KEY,
        deploy_run_id TEXT NOT NULL REFERENCES runs (id),
        sha TEXT NOT NULL,
        manifest_sha256 TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    "#,
    ),
    (
        2,
        r#"
    ALTER TABLE runs ADD COLUMN superseded_by TEXT;
    ALTER TABLE runs ADD COLUMN deferred TEXT;
    ALTER TABLE runs ADD COLUMN github_reported TEXT;
    CREATE INDEX runs_by_status ON runs (status, created_ms);
    CREATE INDEX runs_by_pr ON runs (repository, pr_number, kind);
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        received_ms INTEGER NOT NULL
    );
    CREATE TABLE pull_requests (
        repository TEXT NOT NULL,
        pr INTEGER NOT NULL,
        state TEXT NOT NULL,
        draft INTEGER NOT NULL,
        head_sha TEXT,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (repository, pr)
    );
    CREATE TABLE pr_comments (
        repository TEXT NOT NULL,
        pr INTEGER NOT NULL,
        comment_id INTEGER NOT NULL,
        PRIMARY KEY (repository, pr)
    );
    "#,
    ),
    (
        3,
        // The sandbox a run's build ran in (the agent's `SandboxReport`, as JSON).
        "ALTER TABLE runs ADD COLUMN sandbox TEXT;",
    ),
    (
        4,
        r#"
    ALTER TABLE runs ADD COLUMN lease_expires_ms INTEGER;
    CREATE INDEX runs_by_lease ON runs (status, lease_expires_ms);
    "#,
    ),
    (
        5,
        // The caches a run's attempt used (the agent's `CacheReport`, as JSON).
        "ALTER TABLE runs ADD COLUMN caches TEXT;",
    ),
];

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A repository's production state: the manifest of its last successful deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductionState {
    pub repository: RepoName,
    pub deploy_run_id: RunId,
    pub sha: Sha,
    pub manifest_sha256: String,
    pub updated_ms: i64,
}

/// What `retry_attempt` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The attempt was not the running one (already retried or ended).
    NotRunning,
    Retried(Attempt),
    /// The run ended: cancelled or superseded meanwhile, or out of attempts (`Error`).
    Ended(RunStatus),
}

/// What the coordinator knows of a pull request from webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub repository: RepoName,
    pub pr: PrNumber,
    /// `open` or `closed`.
    pub state: String,
    pub draft: bool,
    pub head_sha: Option<Sha>,
}

/// A run to insert.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub repository: RepoName,
    pub kind: RunKind,
    pub pr: Option<PrNumber>,
    pub sha: Option<Sha>,
    pub fetch_ref: String,
    pub isolation: Option<IsolationName>,
    pub timeout_secs: u64,
    pub production_state: Option<ProductionState>,
    /// `Queued`, or a terminal status for a request refused at admission.
    pub status: RunStatus,
    pub message: Option<String>,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: RunId,
    pub repository: RepoName,
    pub kind: RunKind,
    pub pr: Option<PrNumber>,
    pub sha: Option<Sha>,
    pub fetch_ref: String,
    pub isolation: Option<IsolationName>,
    pub status: RunStatus,
    pub message: Option<String>,
    pub attempt: Attempt,
    pub agent: Option<String>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub timeout_secs: u64,
    pub state_run_id: Option<RunId>,
    pub state_sha: Option<Sha>,
    pub state_manifest_sha256: Option<String>,
    pub progress_done: u32,
    pub progress_total: u32,
    pub last_seq: u64,
    pub cancel_requested: bool,
    pub dbt_exit_code: Option<i32>,
    /// The newer run of the same PR that replaces this one; set while this one's tree is
    /// being stopped, and it ends `superseded`.
    pub superseded_by: Option<RunId>,
    /// Parents read from production instead of being built (CI runs).
    pub deferred: Vec<String>,
    /// The status last reported to GitHub.
    pub github_reported: Option<String>,
    /// Its job message went to the broker.
    pub dispatched: bool,
    /// The agent's `SandboxReport` as JSON, once the build started.
    pub sandbox: Option<String>,
    /// The agent's `CacheReport` as JSON, once the build ran.
    pub caches: Option<String>,
}

impl Run {
    /// The run as the scheduling rules see it.
    pub fn active(&self) -> rules::ActiveRun {
        rules::ActiveRun {
            id: self.id,
            repository: self.repository.clone(),
            kind: self.kind,
            pr: self.pr,
            sha: self.sha.clone(),
            isolation: self.isolation.as_ref().map(ToString::to_string),
            status: self.status,
            dispatched: self.dispatched,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PhaseRecord {
    pub attempt: Attempt,
    pub phase: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub ok: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub created_ms: i64,
}

/// What applying an agent event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub disposition: EventDisposition,
    /// The run reached a terminal status with this event.
    pub finished: Option<RunStatus>,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub repository: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: u32,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn run_from_row(row: &SqliteRow) -> Result<Run> {
    let text =
        |column: &str| -> Result<Option<String>> { Ok(row.try_get::<Option<String>, _>(column)?) };
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let kind: String = row.try_get("kind")?;
    let repository: String = row.try_get("repository")?;
    Ok(Run {
        id: RunId::parse(&id).map_err(corrupt)?,
        repository: RepoName::parse(&repository).map_err(corrupt)?,
        kind: RunKind::parse(&kind).ok_or_else(|| corrupt(format!("run kind {kind}")))?,
        pr: row
            .try_get::<Option<i64>, _>("pr_number")?
            .map(|n| PrNumber(n as u64)),
        sha: text("sha")?
            .map(|sha| Sha::parse(&sha))
            .transpose()
            .map_err(corrupt)?,
        fetch_ref: row.try_get("fetch_ref")?,
        isolation: text("isolation")?
            .map(|name| serde_json::from_value(serde_json::Value::String(name)))
            .transpose()
            .map_err(corrupt)?,
        status: RunStatus::parse(&status).ok_or_else(|| corrupt(format!("run status {status}")))?,
        message: text("message")?,
        attempt: Attempt(row.try_get::<i64, _>("attempt")? as u32),
        agent: text("agent")?,
        created_ms: row.try_get("created_ms")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        timeout_secs: row.try_get::<i64, _>("timeout_secs")? as u64,
        state_run_id: text("state_run_id")?
            .map(|id| RunId::parse(&id))
            .transpose()
            .map_err(corrupt)?,
        state_sha: text("state_sha")?
            .map(|sha| Sha::parse(&sha))
            .transpose()
            .map_err(corrupt)?,
        state_manifest_sha256: text("state_manifest_sha256")?,
        progress_done: row.try_get::<i64, _>("progress_done")? as u32,
        progress_total: row.try_get::<i64, _>("progress_total")? as u32,
        last_seq: row.try_get::<i64, _>("last_seq")? as u64,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        dbt_exit_code: row
            .try_get::<Option<i64>, _>("dbt_exit_code")?
            .map(|code| code as i32),
        superseded_by: text("superseded_by")?
            .map(|id| RunId::parse(&id))
            .transpose()
            .map_err(corrupt)?,
        deferred: text("deferred")?
            .map(|json| serde_json::from_str(&json))
            .transpose()
            .map_err(corrupt)?
            .unwrap_or_default(),
        github_reported: text("github_reported")?,
        dispatched: row.try_get::<i64, _>("published")? != 0,
        sandbox: text("sandbox")?,
        caches: text("caches")?,
    })
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/slimci.db` and applies pending migrations.
    pub async fn open(data_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(data_dir.join("slimci.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // Migrate over one connection, then open the pool on the final schema: sqlx keeps each
        // prepared statement's columns, and a connection that loaded the schema before an
        // `ALTER TABLE` read `SELECT *` rows with the old column list (and panicked).
        let migrating = Store {
            pool: SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?,
        };
        migrating.migrate().await?;
        migrating.pool.close().await;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)")
            .execute(&self.pool)
            .await?;
        for (version, sql) in MIGRATIONS {
            // IMMEDIATE: take the write lock at the start (waiting with the busy timeout), not on the
            // first write, where a concurrent writer would fail it with SQLITE_BUSY at once.
            let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                    .bind(version)
                    .fetch_optional(&mut *transaction)
                    .await?;
            if done.is_some() {
                continue;
            }
            sqlx::raw_sql(sql).execute(&mut *transaction).await?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES (?, ?)")
                .bind(version)
                .bind(now_ms())
                .execute(&mut *transaction)
                .await?;
            transaction.commit().await?;
            tracing::info!(version, "applied database migration");
        }
        Ok(())
    }

    pub async fn insert_run(&self, run: &NewRun) -> Result<()> {
        let now = now_ms();
        let state = run.production_state.as_ref();
        sqlx::query(
            "INSERT INTO runs (id, repository, kind, pr_number, sha, fetch_ref, isolation, status, message,
                created_ms, finished_ms, timeout_secs, state_run_id, state_sha, state_manifest_sha256)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(run.id.to_string())
        .bind(run.repository.as_str())
        .bind(run.kind.as_str())
        .bind(run.pr.map(|pr| pr.0 as i64))
        .bind(run.sha.as_ref().map(Sha::as_str))
        .bind(&run.fetch_ref)
        .bind(run.isolation.as_ref().map(IsolationName::as_str))
        .bind(run.status.as_str())
        .bind(&run.message)
        .bind(now)
        .bind(run.status.is_terminal().then_some(now))
        .bind(run.timeout_secs as i64)
        .bind(state.map(|state| state.deploy_run_id.to_string()))
        .bind(state.map(|state| state.sha.as_str()))
        .bind(state.map(|state| state.manifest_sha256.as_str()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn run(&self, id: RunId) -> Result<Option<Run>> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    pub async fn runs(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs
             WHERE (?1 IS NULL OR repository = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY created_ms DESC, id DESC LIMIT ?3",
        )
        .bind(&filter.repository)
        .bind(filter.status.map(RunStatus::as_str))
        .bind(filter.limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn phases(&self, id: RunId) -> Result<Vec<PhaseRecord>> {
        let rows = sqlx::query(
            "SELECT attempt, phase, started_ms, finished_ms, ok FROM run_phases WHERE run_id = ? ORDER BY attempt, started_ms",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PhaseRecord {
                    attempt: Attempt(row.try_get::<i64, _>("attempt")? as u32),
                    phase: row.try_get("phase")?,
                    started_ms: row.try_get("started_ms")?,
                    finished_ms: row.try_get("finished_ms")?,
                    ok: row.try_get::<Option<i64>, _>("ok")?.map(|ok| ok != 0),
                })
            })
            .collect()
    }

    pub async fn nodes(&self, id: RunId) -> Result<Vec<NodeResult>> {
        let rows = sqlx::query("SELECT * FROM run_nodes WHERE run_id = ? ORDER BY rowid")
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeResult {
                    unique_id: row.try_get("unique_id")?,
                    resource_type: row.try_get("resource_type")?,
                    status: row.try_get("status")?,
                    execution_time_s: row.try_get("execution_time_s")?,
                    message: row.try_get("message")?,
                    failures: row.try_get::<Option<i64>, _>("failures")?.map(|n| n as u64),
                    relation: row.try_get("relation")?,
                })
            })
            .collect()
    }

    pub async fn production_state(&self, repository: &RepoName) -> Result<Option<ProductionState>> {
        let row = sqlx::query("SELECT * FROM production_state WHERE repository = ?")
            .bind(repository.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let run_id: String = row.try_get("deploy_run_id")?;
            let sha: String = row.try_get("sha")?;
            Ok(ProductionState {
                repository: repository.clone(),
                deploy_run_id: RunId::parse(&run_id).map_err(corrupt)?,
                sha: Sha::parse(&sha).map_err(corrupt)?,
                manifest_sha256: row.try_get("manifest_sha256")?,
                updated_ms: row.try_get("updated_ms")?,
            })
        })
        .transpose()
    }

    pub async fn mark_published(&self, id: RunId) -> Result<()> {
        sqlx::query("UPDATE runs SET published = 1 WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Grants or refuses an agent's claim, atomically: at most one claim of an attempt wins. A
    /// granted claim holds a lease of `lease_ms`.
    pub async fn claim(&self, claim: &ClaimRequest, lease_ms: i64) -> Result<ClaimDecision> {
        let Some(run) = self.run(claim.run_id).await? else {
            return Ok(ClaimDecision::Refuse(format!(
                "unknown run {}",
                claim.run_id
            )));
        };
        let view = ClaimView {
            status: run.status,
            attempt: run.attempt,
            agent: run.agent.clone(),
        };
        if let ClaimDecision::Refuse(reason) = rules::decide_claim(&view, claim) {
            return Ok(ClaimDecision::Refuse(reason));
        }
        let updated = sqlx::query(
            "UPDATE runs SET status = 'running', agent = ?, started_ms = ?, lease_expires_ms = ?
             WHERE id = ? AND attempt = ? AND status = 'queued'",
        )
        .bind(claim.agent.as_str())
        .bind(now_ms())
        .bind(now_ms() + lease_ms)
        .bind(claim.run_id.to_string())
        .bind(claim.attempt.0 as i64)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 1 {
            Ok(ClaimDecision::Grant)
        } else {
            Ok(ClaimDecision::Refuse(
                "claimed concurrently by another agent".to_owned(),
            ))
        }
    }

    /// Ends a run that has not started (or was refused at admission) with `status`. Returns
    /// false if it had already left `queued`.
    pub async fn end_queued(&self, id: RunId, status: RunStatus, message: &str) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE runs SET status = ?, message = ?, finished_ms = ? WHERE id = ? AND status = 'queued'",
        )
        .bind(status.as_str())
        .bind(message)
        .bind(now_ms())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    pub async fn request_cancel(&self, id: RunId) -> Result<()> {
        sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Where an event stands against the run's attempt and sequence, without changing anything.
    pub async fn event_disposition(&self, event: &AgentEvent) -> Result<Option<EventDisposition>> {
        let Some(run) = self.run(event.run_id).await? else {
            return Ok(None);
        };
        Ok(Some(rules::event_disposition(
            run.status,
            run.attempt,
            run.last_seq,
            event.attempt,
            event.seq,
        )))
    }

    /// Applies an agent event whose log lines (if any) are already on disk.
    pub async fn apply_event(&self, event: &AgentEvent) -> Result<Applied> {
        // IMMEDIATE: take the write lock at the start (waiting with the busy timeout), not on the
        // first write, where a concurrent writer would fail it with SQLITE_BUSY at once.
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let run_id = event.run_id.to_string();
        let row = sqlx::query("SELECT * FROM runs WHERE id = ?")
            .bind(&run_id)
            .fetch_optional(&mut *transaction)
            .await?;
        let Some(run) = row.as_ref().map(run_from_row).transpose()? else {
            return Ok(Applied {
                disposition: EventDisposition::StaleAttempt,
                finished: None,
            });
        };
        let disposition = rules::event_disposition(
            run.status,
            run.attempt,
            run.last_seq,
            event.attempt,
            event.seq,
        );
        if disposition != EventDisposition::Apply {
            return Ok(Applied {
                disposition,
                finished: None,
            });
        }
        let at = event.at.timestamp_millis();
        let attempt = event.attempt.0 as i64;
        let mut finished = None;
        match &event.body {
            EventBody::Started { sha } => {
                sqlx::query("UPDATE runs SET sha = ? WHERE id = ?")
                    .bind(sha.as_str())
                    .bind(&run_id)
                    .execute(&mut *transaction)
                    .await?;
            }
            EventBody::PhaseStarted { phase } => {
                sqlx::query(
                    "INSERT INTO run_phases (run_id, attempt, phase, started_ms) VALUES (?, ?, ?, ?)
                     ON CONFLICT (run_id, attempt, phase) DO UPDATE SET started_ms = excluded.started_ms",
                )
                .bind(&run_id)
                .bind(attempt)
                .bind(phase.as_str())
                .bind(at)
                .execute(&mut *transaction)
                .await?;
            }
            EventBody::PhaseFinished { phase, ok } => {
                sqlx::query(
                    "INSERT INTO run_phases (run_id, attempt, phase, started_ms, finished_ms, ok) VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (run_id, attempt, phase) DO UPDATE SET finished_ms = excluded.finished_ms, ok = excluded.ok",
                )
                .bind(&run_id)
                .bind(attempt)
                .bind(phase.as_str())
                .bind(at)
                .bind(at)
                .bind(*ok as i64)
                .execute(&mut *transaction)
                .await?;
            }
            EventBody::Progress { done, total } => {
                sqlx::query("UPDATE runs SET progress_done = ?, progress_total = ? WHERE id = ?")
                    .bind(*done as i64)
                    .bind(*total as i64)
                    .bind(&run_id)
                    .execute(&mut *transaction)
                    .await?;
            }
            EventBody::Log { .. } | EventBody::Released { .. } => {}
            EventBody::Sandbox(report) => {
                let json = serde_json::to_string(report).map_err(corrupt)?;
                sqlx::query("UPDATE runs SET sandbox = ? WHERE id = ?")
                    .bind(json)
                    .bind(&run_id)
                    .execute(&mut *transaction)
                    .await?;
            }
            EventBody::Caches(report) => {
                let json = serde_json::to_string(report).map_err(corrupt)?;
                sqlx::query("UPDATE runs SET caches = ? WHERE id = ?")
                    .bind(json)
                    .bind(&run_id)
                    .execute(&mut *transaction)
                    .await?;
            }
            EventBody::Finished(outcome) => {
                let status = self.finish(&mut transaction, &run, outcome, at).await?;
                finished = Some(status);
            }
        }
        sqlx::query("UPDATE runs SET last_seq = ? WHERE id = ?")
            .bind(event.seq as i64)
            .bind(&run_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Applied {
            disposition,
            finished,
        })
    }

    async fn finish(
        &self,
        transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        run: &Run,
        outcome: &Outcome,
        at: i64,
    ) -> Result<RunStatus> {
        let run_id = run.id.to_string();
        for node in &outcome.nodes {
            sqlx::query(
                "INSERT OR REPLACE INTO run_nodes (run_id, unique_id, resource_type, status, execution_time_s, message, failures, relation)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&run_id)
            .bind(&node.unique_id)
            .bind(&node.resource_type)
            .bind(&node.status)
            .bind(node.execution_time_s)
            .bind(&node.message)
            .bind(node.failures.map(|n| n as i64))
            .bind(&node.relation)
            .execute(&mut **transaction)
            .await?;
        }
        let mut status = RunStatus::from_result(outcome.result);
        let mut message = outcome.message.clone();
        if let Some(newer) = run.superseded_by {
            // Its tree is gone now; the newer run of the PR may start.
            message = Some(match outcome.result {
                RunResult::Cancelled => {
                    format!("superseded by run {newer}, a newer commit of the PR")
                }
                other => format!(
                    "superseded by run {newer}, a newer commit of the PR (this build had ended {})",
                    RunStatus::from_result(other).as_str()
                ),
            });
            status = RunStatus::Superseded;
        }
        if !outcome.deferred.is_empty() {
            sqlx::query("UPDATE runs SET deferred = ? WHERE id = ?")
                .bind(serde_json::to_string(&outcome.deferred).expect("strings serialize"))
                .bind(&run_id)
                .execute(&mut **transaction)
                .await?;
        }
        if run.kind == RunKind::Deploy && outcome.result == RunResult::Success {
            let manifest: Option<String> = sqlx::query_scalar(
                "SELECT sha256 FROM artifacts WHERE run_id = ? AND name = 'manifest.json'",
            )
            .bind(&run_id)
            .fetch_optional(&mut **transaction)
            .await?;
            // The agent reports the commit it built before it finishes; a deploy without one
            // cannot become production state.
            let sha: Option<String> = sqlx::query_scalar("SELECT sha FROM runs WHERE id = ?")
                .bind(&run_id)
                .fetch_one(&mut **transaction)
                .await?;
            match (manifest, sha) {
                (Some(manifest_sha256), Some(sha)) => {
                    sqlx::query(
                        "INSERT INTO production_state (repository, deploy_run_id, sha, manifest_sha256, updated_ms)
                         VALUES (?, ?, ?, ?, ?)
                         ON CONFLICT (repository) DO UPDATE SET deploy_run_id = excluded.deploy_run_id,
                            sha = excluded.sha, manifest_sha256 = excluded.manifest_sha256, updated_ms = excluded.updated_ms",
                    )
                    .bind(run.repository.as_str())
                    .bind(&run_id)
                    .bind(&sha)
                    .bind(&manifest_sha256)
                    .bind(at)
                    .execute(&mut **transaction)
                    .await?;
                }
                _ => {
                    status = RunStatus::Error;
                    message = Some(
                        "the deploy built, but its manifest.json or commit never reached the coordinator, so production state was not updated".to_owned(),
                    );
                }
            }
        }
        sqlx::query(
            "UPDATE runs SET status = ?, message = ?, finished_ms = ?, dbt_exit_code = ? WHERE id = ?",
        )
        .bind(status.as_str())
        .bind(&message)
        .bind(at.max(run.started_ms.unwrap_or(at)))
        .bind(outcome.dbt_exit_code)
        .bind(&run_id)
        .execute(&mut **transaction)
        .await?;
        Ok(status)
    }

    pub async fn record_artifact(&self, id: RunId, artifact: &ArtifactRecord) -> Result<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO artifacts (run_id, name, size, sha256, created_ms) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(&artifact.name)
        .bind(artifact.size as i64)
        .bind(&artifact.sha256)
        .bind(artifact.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn artifacts(&self, id: RunId) -> Result<Vec<ArtifactRecord>> {
        let rows = sqlx::query(
            "SELECT name, size, sha256, created_ms FROM artifacts WHERE run_id = ? ORDER BY name",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ArtifactRecord {
                    name: row.try_get("name")?,
                    size: row.try_get::<i64, _>("size")? as u64,
                    sha256: row.try_get("sha256")?,
                    created_ms: row.try_get("created_ms")?,
                })
            })
            .collect()
    }

    /// Running runs a user asked to cancel; the publisher tells the agents.
    pub async fn cancel_pending_runs(&self) -> Result<Vec<RunId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE status = 'running' AND cancel_requested = 1",
        )
        .fetch_all(&self.pool)
        .await?;
        ids.iter()
            .map(|id| RunId::parse(id).map_err(corrupt))
            .collect()
    }

    /// Renews the leases `agent` holds; returns the ones it does not hold any more.
    pub async fn renew_leases(
        &self,
        agent: &str,
        leases: &[Lease],
        lease_ms: i64,
    ) -> Result<Vec<Lease>> {
        let mut lost = Vec::new();
        for lease in leases {
            let renewed = sqlx::query(
                "UPDATE runs SET lease_expires_ms = ? WHERE id = ? AND attempt = ? AND agent = ? AND status = 'running'",
            )
            .bind(now_ms() + lease_ms)
            .bind(lease.run_id.to_string())
            .bind(lease.attempt.0 as i64)
            .bind(agent)
            .execute(&self.pool)
            .await?;
            if renewed.rows_affected() == 0 {
                lost.push(*lease);
            }
        }
        Ok(lost)
    }

    /// After a coordinator restart: every running attempt gets a full lease again, so agents
    /// that could not reach us meanwhile are not taken for dead.
    pub async fn extend_all_leases(&self, lease_ms: i64) -> Result<u64> {
        let extended = sqlx::query("UPDATE runs SET lease_expires_ms = ? WHERE status = 'running'")
            .bind(now_ms() + lease_ms)
            .execute(&self.pool)
            .await?;
        Ok(extended.rows_affected())
    }

    /// Running attempts whose lease ran out.
    pub async fn expired_leases(&self) -> Result<Vec<Run>> {
        let rows =
            sqlx::query("SELECT * FROM runs WHERE status = 'running' AND lease_expires_ms < ?")
                .bind(now_ms())
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// Ends attempt `attempt` of a running run without a result (its agent died or gave it
    /// up): retries it as the next attempt, or ends it if that was the last one allowed, or if
    /// it was being cancelled or superseded anyway.
    pub async fn retry_attempt(
        &self,
        id: RunId,
        attempt: Attempt,
        reason: &str,
        max_attempts: u32,
    ) -> Result<Retry> {
        // IMMEDIATE: take the write lock at the start (waiting with the busy timeout), not on the
        // first write, where a concurrent writer would fail it with SQLITE_BUSY at once.
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row =
            sqlx::query("SELECT * FROM runs WHERE id = ? AND attempt = ? AND status = 'running'")
                .bind(id.to_string())
                .bind(attempt.0 as i64)
                .fetch_optional(&mut *transaction)
                .await?;
        let Some(run) = row.as_ref().map(run_from_row).transpose()? else {
            return Ok(Retry::NotRunning);
        };
        let (status, message) = if let Some(newer) = run.superseded_by {
            (
                RunStatus::Superseded,
                format!("superseded by run {newer}, a newer commit of the PR ({reason})"),
            )
        } else if run.cancel_requested {
            (RunStatus::Cancelled, format!("cancelled ({reason})"))
        } else if attempt.0 >= max_attempts {
            (
                RunStatus::Error,
                format!("gave up after {} attempts; the last: {reason}", attempt.0),
            )
        } else {
            let next = Attempt(attempt.0 + 1);
            sqlx::query(
                "UPDATE runs SET attempt = ?, status = 'queued', published = 0, agent = NULL, started_ms = NULL,
                    lease_expires_ms = NULL, last_seq = 0, progress_done = 0, progress_total = 0, message = ?
                 WHERE id = ?",
            )
            .bind(next.0 as i64)
            .bind(format!("attempt {} failed without a result: {reason}; retrying as attempt {}", attempt.0, next.0))
            .bind(id.to_string())
            .execute(&mut *transaction)
            .await?;
            transaction.commit().await?;
            return Ok(Retry::Retried(next));
        };
        sqlx::query("UPDATE runs SET status = ?, message = ?, finished_ms = ?, lease_expires_ms = NULL WHERE id = ?")
            .bind(status.as_str())
            .bind(&message)
            .bind(now_ms())
            .bind(id.to_string())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Retry::Ended(status))
    }

    /// What the scheduling rules need of every queued and running run, oldest first: only
    /// those columns, so the publisher's every wake stays cheap with a long queue.
    pub async fn active_for_rules(&self) -> Result<Vec<rules::ActiveRun>> {
        let rows = sqlx::query(
            "SELECT id, repository, kind, pr_number, sha, isolation, status, published FROM runs WHERE status IN ('queued', 'running') ORDER BY created_ms, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let repository: String = row.try_get("repository")?;
                let kind: String = row.try_get("kind")?;
                let status: String = row.try_get("status")?;
                Ok(rules::ActiveRun {
                    id: RunId::parse(&id).map_err(corrupt)?,
                    repository: RepoName::parse(&repository).map_err(corrupt)?,
                    kind: RunKind::parse(&kind)
                        .ok_or_else(|| corrupt(format!("run kind {kind}")))?,
                    pr: row
                        .try_get::<Option<i64>, _>("pr_number")?
                        .map(|n| PrNumber(n as u64)),
                    sha: row
                        .try_get::<Option<String>, _>("sha")?
                        .map(|sha| Sha::parse(&sha))
                        .transpose()
                        .map_err(corrupt)?,
                    isolation: row.try_get("isolation")?,
                    status: RunStatus::parse(&status)
                        .ok_or_else(|| corrupt(format!("run status {status}")))?,
                    dispatched: row.try_get::<i64, _>("published")? != 0,
                })
            })
            .collect()
    }

    /// The queued and running runs of one repository, kind and PR (none for deploys): what a
    /// new submission may answer with or supersede, without reading the whole queue.
    pub async fn active_runs_of(
        &self,
        repository: &RepoName,
        kind: RunKind,
        pr: Option<PrNumber>,
    ) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE repository = ? AND kind = ? AND pr_number IS ? AND status IN ('queued', 'running') ORDER BY created_ms, id",
        )
        .bind(repository.as_str())
        .bind(kind.as_str())
        .bind(pr.map(|pr| pr.0 as i64))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// Stamps the production state a CI run compares against, as it is dispatched.
    pub async fn stamp_production_state(&self, id: RunId, state: &ProductionState) -> Result<()> {
        sqlx::query("UPDATE runs SET state_run_id = ?, state_sha = ?, state_manifest_sha256 = ? WHERE id = ? AND status = 'queued'")
            .bind(state.deploy_run_id.to_string())
            .bind(state.sha.as_str())
            .bind(&state.manifest_sha256)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Supersedes `old` by `newer`: a run that has not started ends now; a running one is
    /// marked, and ends `superseded` when its agent reports the tree gone. Returns whether the
    /// agents must be told to stop it.
    pub async fn supersede(&self, old: RunId, newer: RunId) -> Result<bool> {
        let message = format!("superseded by run {newer}, a newer commit of the PR");
        if self
            .end_queued(old, RunStatus::Superseded, &message)
            .await?
        {
            return Ok(false);
        }
        let updated = sqlx::query(
            "UPDATE runs SET superseded_by = ?, cancel_requested = 1 WHERE id = ? AND status = 'running'",
        )
        .bind(newer.to_string())
        .bind(old.to_string())
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// 1 for the next queued run to start, 2 for the one after, ...; none once it started.
    pub async fn queue_position(&self, run: &Run) -> Result<Option<u32>> {
        if run.status != RunStatus::Queued {
            return Ok(None);
        }
        let ahead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE status = 'queued' AND (created_ms < ?1 OR (created_ms = ?1 AND id < ?2))",
        )
        .bind(run.created_ms)
        .bind(run.id.to_string())
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(ahead as u32 + 1))
    }

    /// The newest CI run of a pull request.
    pub async fn latest_ci_run(&self, repository: &RepoName, pr: PrNumber) -> Result<Option<Run>> {
        let row = sqlx::query(
            "SELECT * FROM runs WHERE repository = ? AND pr_number = ? AND kind = 'ci' ORDER BY created_ms DESC, id DESC LIMIT 1",
        )
        .bind(repository.as_str())
        .bind(pr.0 as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// Records a webhook delivery id; false if it was seen before (a replay).
    pub async fn record_delivery(&self, id: &str, event: &str) -> Result<bool> {
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO webhook_deliveries (id, event, received_ms) VALUES (?, ?, ?)",
        )
        .bind(id)
        .bind(event)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    pub async fn upsert_pull_request(&self, pull: &PullRequest) -> Result<()> {
        sqlx::query(
            "INSERT INTO pull_requests (repository, pr, state, draft, head_sha, updated_ms) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (repository, pr) DO UPDATE SET state = excluded.state, draft = excluded.draft,
                head_sha = excluded.head_sha, updated_ms = excluded.updated_ms",
        )
        .bind(pull.repository.as_str())
        .bind(pull.pr.0 as i64)
        .bind(&pull.state)
        .bind(pull.draft as i64)
        .bind(pull.head_sha.as_ref().map(Sha::as_str))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn pull_request(
        &self,
        repository: &RepoName,
        pr: PrNumber,
    ) -> Result<Option<PullRequest>> {
        let row = sqlx::query("SELECT * FROM pull_requests WHERE repository = ? AND pr = ?")
            .bind(repository.as_str())
            .bind(pr.0 as i64)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(PullRequest {
                repository: repository.clone(),
                pr,
                state: row.try_get("state")?,
                draft: row.try_get::<i64, _>("draft")? != 0,
                head_sha: row
                    .try_get::<Option<String>, _>("head_sha")?
                    .map(|sha| Sha::parse(&sha))
                    .transpose()
                    .map_err(corrupt)?,
            })
        })
        .transpose()
    }

    pub async fn comment_id(&self, repository: &RepoName, pr: PrNumber) -> Result<Option<u64>> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT comment_id FROM pr_comments WHERE repository = ? AND pr = ?",
        )
        .bind(repository.as_str())
        .bind(pr.0 as i64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(|id| id as u64))
    }

    pub async fn set_comment_id(
        &self,
        repository: &RepoName,
        pr: PrNumber,
        comment_id: Option<u64>,
    ) -> Result<()> {
        match comment_id {
            Some(comment_id) => {
                sqlx::query("INSERT OR REPLACE INTO pr_comments (repository, pr, comment_id) VALUES (?, ?, ?)")
                    .bind(repository.as_str())
                    .bind(pr.0 as i64)
                    .bind(comment_id as i64)
                    .execute(&self.pool)
                    .await?;
            }
            None => {
                sqlx::query("DELETE FROM pr_comments WHERE repository = ? AND pr = ?")
                    .bind(repository.as_str())
                    .bind(pr.0 as i64)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Runs whose status differs from what GitHub was last told, oldest first.
    pub async fn runs_to_report(&self, limit: u32) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE kind IN ('ci', 'deploy') AND sha IS NOT NULL
               AND (github_reported IS NULL OR github_reported != status)
             ORDER BY created_ms LIMIT ?",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn set_reported(&self, id: RunId, status: RunStatus) -> Result<()> {
        sqlx::query("UPDATE runs SET github_reported = ? WHERE id = ?")
            .bind(status.as_str())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// PRs whose isolation may be left behind: CI builds all ended before `cutoff_ms`, and no
    /// teardown queued, running or succeeded since the last of them.
    pub async fn sweep_candidates(&self, cutoff_ms: i64) -> Result<Vec<(RepoName, PrNumber, i64)>> {
        let rows = sqlx::query(
            "WITH prs AS (
                SELECT repository, pr_number, max(finished_ms) AS last_finished, max(created_ms) AS last_created,
                       sum(status IN ('queued', 'running')) AS active
                FROM runs WHERE kind = 'ci' AND pr_number IS NOT NULL
                GROUP BY repository, pr_number)
             SELECT repository, pr_number, last_finished FROM prs
             WHERE active = 0 AND last_finished < ?1
               AND NOT EXISTS (
                   SELECT 1 FROM runs t
                   WHERE t.kind = 'teardown' AND t.repository = prs.repository AND t.pr_number = prs.pr_number
                     AND t.created_ms >= prs.last_created AND t.status IN ('queued', 'running', 'success'))",
        )
        .bind(cutoff_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let repository: String = row.try_get("repository")?;
                Ok((
                    RepoName::parse(&repository).map_err(corrupt)?,
                    PrNumber(row.try_get::<i64, _>("pr_number")? as u64),
                    row.try_get::<i64, _>("last_finished")?,
                ))
            })
            .collect()
    }

    /// Runs that are not terminal, for the status line at start-up.
    pub async fn count_active(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

/// `Phase` names as the store writes them, for readers that want the enum back.
pub fn phase_order(name: &str) -> usize {
    [
        Phase::Checkout,
        Phase::StateFetch,
        Phase::Deps,
        Phase::Profile,
        Phase::Build,
        Phase::Upload,
    ]
    .iter()
    .position(|phase| phase.as_str() == name)
    .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use slimci_proto::AgentName;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        (dir, store)
    }

    fn new_run(kind: RunKind) -> NewRun {
        let repository = RepoName::parse("shop").unwrap();
        NewRun {
            id: RunId::new(),
            kind,
            pr: (kind == RunKind::Ci).then_some(PrNumber(4)),
            sha: Some(Sha::parse(&"ab".repeat(20)).unwrap()),
            fetch_ref: "refs/heads/main".into(),
            isolation: (kind == RunKind::Ci)
                .then(|| IsolationName::for_pr(&repository, PrNumber(4))),
            repository,
            timeout_secs: 60,
            production_state: None,
            status: RunStatus::Queued,
            message: None,
        }
    }

    fn event(run: &NewRun, seq: u64, body: EventBody) -> AgentEvent {
        AgentEvent {
            run_id: run.id,
            attempt: Attempt(1),
            agent: AgentName::parse("a1").unwrap(),
            seq,
            at: Utc::now(),
            body,
        }
    }

    fn claim(run: &NewRun) -> ClaimRequest {
        ClaimRequest {
            run_id: run.id,
            attempt: Attempt(1),
            agent: AgentName::parse("a1").unwrap(),
        }
    }

    #[tokio::test]
    async fn a_run_survives_reopening_the_store() {
        let (dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        drop(store);
        let reopened = Store::open(dir.path()).await.unwrap();
        let stored = reopened.run(run.id).await.unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Queued);
        assert_eq!(stored.isolation.unwrap().as_str(), "pr_shop_4");
    }

    #[tokio::test]
    async fn sweep_candidates_are_finished_prs_without_a_later_teardown() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        assert!(
            store
                .sweep_candidates(now_ms() + 1000)
                .await
                .unwrap()
                .is_empty(),
            "still queued"
        );
        store.claim(&claim(&run), 60_000).await.unwrap();
        let outcome = Outcome {
            result: RunResult::Success,
            message: None,
            dbt_exit_code: Some(0),
            nodes: vec![],
            deferred: vec![],
        };
        store
            .apply_event(&event(&run, 1, EventBody::Finished(outcome)))
            .await
            .unwrap();
        assert!(
            store
                .sweep_candidates(now_ms() - 60_000)
                .await
                .unwrap()
                .is_empty(),
            "too recent"
        );
        let candidates = store.sweep_candidates(now_ms() + 1000).await.unwrap();
        assert_eq!(candidates.len(), 1, "{candidates:?}");
        assert_eq!(candidates[0].1, PrNumber(4));
        let teardown = NewRun {
            id: RunId::new(),
            kind: RunKind::Teardown,
            sha: None,
            ..new_run(RunKind::Ci)
        };
        store.insert_run(&teardown).await.unwrap();
        assert!(
            store
                .sweep_candidates(now_ms() + 1000)
                .await
                .unwrap()
                .is_empty(),
            "a teardown is queued"
        );
    }

    #[tokio::test]
    async fn a_lost_attempt_is_retried_then_given_up() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), -1).await.unwrap();
        let expired = store.expired_leases().await.unwrap();
        assert_eq!(expired.len(), 1, "a lease in the past has expired");
        assert_eq!(
            store
                .retry_attempt(run.id, Attempt(1), "agent died", 2)
                .await
                .unwrap(),
            Retry::Retried(Attempt(2))
        );
        let retried = store.run(run.id).await.unwrap().unwrap();
        assert_eq!(
            (retried.status, retried.attempt, retried.dispatched),
            (RunStatus::Queued, Attempt(2), false)
        );
        assert_eq!(
            store
                .retry_attempt(run.id, Attempt(1), "late", 2)
                .await
                .unwrap(),
            Retry::NotRunning,
            "the old attempt is fenced"
        );
        let second = ClaimRequest {
            attempt: Attempt(2),
            ..claim(&run)
        };
        assert_eq!(
            store.claim(&second, 60_000).await.unwrap(),
            ClaimDecision::Grant
        );
        let lost = store
            .renew_leases(
                "a1",
                &[Lease {
                    run_id: run.id,
                    attempt: Attempt(1),
                }],
                60_000,
            )
            .await
            .unwrap();
        assert_eq!(
            lost.len(),
            1,
            "the agent is told attempt 1 is not its any more"
        );
        assert!(
            store
                .renew_leases(
                    "a1",
                    &[Lease {
                        run_id: run.id,
                        attempt: Attempt(2)
                    }],
                    60_000
                )
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store
                .retry_attempt(run.id, Attempt(2), "agent died again", 2)
                .await
                .unwrap(),
            Retry::Ended(RunStatus::Error)
        );
        let ended = store.run(run.id).await.unwrap().unwrap();
        assert!(ended.message.unwrap().contains("gave up after 2 attempts"));
    }

    #[tokio::test]
    async fn only_one_claim_wins() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        assert_eq!(
            store.claim(&claim(&run), 60_000).await.unwrap(),
            ClaimDecision::Grant
        );
        assert_eq!(
            store.claim(&claim(&run), 60_000).await.unwrap(),
            ClaimDecision::Refuse("already claimed by a1".into())
        );
    }

    #[tokio::test]
    async fn a_successful_deploy_becomes_production_state() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Deploy);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), 60_000).await.unwrap();
        store
            .record_artifact(
                run.id,
                &ArtifactRecord {
                    name: "manifest.json".into(),
                    size: 2,
                    sha256: "cafe".into(),
                    created_ms: 0,
                },
            )
            .await
            .unwrap();
        let outcome = Outcome {
            result: RunResult::Success,
            message: None,
            dbt_exit_code: Some(0),
            nodes: vec![],
            deferred: vec![],
        };
        let applied = store
            .apply_event(&event(&run, 1, EventBody::Finished(outcome)))
            .await
            .unwrap();
        assert_eq!(applied.finished, Some(RunStatus::Success));
        let state = store
            .production_state(&run.repository)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(state.deploy_run_id, run.id);
        assert_eq!(state.manifest_sha256, "cafe");
    }

    #[tokio::test]
    async fn a_deploy_without_manifest_does_not_change_production_state() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Deploy);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), 60_000).await.unwrap();
        let outcome = Outcome {
            result: RunResult::Success,
            message: None,
            dbt_exit_code: Some(0),
            nodes: vec![],
            deferred: vec![],
        };
        let applied = store
            .apply_event(&event(&run, 1, EventBody::Finished(outcome)))
            .await
            .unwrap();
        assert_eq!(applied.finished, Some(RunStatus::Error));
        assert!(
            store
                .production_state(&run.repository)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn the_sandbox_report_is_stored_with_the_run() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), 60_000).await.unwrap();
        let report = slimci_proto::SandboxReport {
            pid_namespace: true,
            cgroup: "v2".into(),
            memory_limit_bytes: Some(1 << 32),
            pids_limit: Some(512),
            landlock: "full".into(),
            landlock_abi: Some(6),
            user: "slimci-build".into(),
            uid: 998,
            rlimit_nofile: 4096,
            rlimit_nproc: Some(512),
            core_dumps: false,
            warnings: vec![],
            prestarted: false,
        };
        store
            .apply_event(&event(&run, 1, EventBody::Sandbox(report.clone())))
            .await
            .unwrap();
        let stored = store.run(run.id).await.unwrap().unwrap().sandbox.unwrap();
        assert_eq!(
            serde_json::from_str::<slimci_proto::SandboxReport>(&stored).unwrap(),
            report
        );
    }

    #[tokio::test]
    async fn duplicate_and_late_events_change_nothing() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), 60_000).await.unwrap();
        let progress = |seq, done| event(&run, seq, EventBody::Progress { done, total: 9 });
        assert_eq!(
            store
                .apply_event(&progress(1, 3))
                .await
                .unwrap()
                .disposition,
            EventDisposition::Apply
        );
        assert_eq!(
            store
                .apply_event(&progress(1, 5))
                .await
                .unwrap()
                .disposition,
            EventDisposition::Duplicate
        );
        assert_eq!(store.run(run.id).await.unwrap().unwrap().progress_done, 3);
        let outcome = Outcome {
            result: RunResult::Failed,
            message: None,
            dbt_exit_code: Some(1),
            nodes: vec![],
            deferred: vec![],
        };
        store
            .apply_event(&event(&run, 2, EventBody::Finished(outcome)))
            .await
            .unwrap();
        assert_eq!(
            store
                .apply_event(&progress(3, 9))
                .await
                .unwrap()
                .disposition,
            EventDisposition::RunEnded
        );
        assert_eq!(
            store.run(run.id).await.unwrap().unwrap().status,
            RunStatus::Failed
        );
    }
}
