//! The database schema: the ordered, append-only `MIGRATIONS`, and applying the pending ones
//! when the store opens.

use super::{Result, Store, now_ms};

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
    (
        6,
        // What the adapter said of each node's query (dbt's `adapter_response`, as JSON).
        "ALTER TABLE run_nodes ADD COLUMN adapter_response TEXT;",
    ),
    (
        7,
        // The run's trace: its root span's W3C `traceparent` (exported when the run ends, then
        // `trace_ended` is set), when traces are exported.
        r#"
    ALTER TABLE runs ADD COLUMN traceparent TEXT;
    ALTER TABLE runs ADD COLUMN trace_ended INTEGER NOT NULL DEFAULT 0;
    "#,
    ),
    (
        8,
        // Who or what asked for the run (`slimci_client::Trigger`, as JSON), recorded where
        // the request came in; NULL for runs made before.
        "ALTER TABLE runs ADD COLUMN triggered_by TEXT;",
    ),
    (
        9,
        // The dbt Cloud run a publish run imported the manifest of (production from dbt Cloud).
        "ALTER TABLE runs ADD COLUMN dbt_cloud_run_id INTEGER;",
    ),
    (
        10,
        // Where a CI run builds, once routed (`fleet` or `dbt_cloud`), and why; a run built by
        // dbt Cloud keeps its Cloud run in `dbt_cloud_run_id`.
        r#"
    ALTER TABLE runs ADD COLUMN backend TEXT;
    ALTER TABLE runs ADD COLUMN backend_reason TEXT;
    CREATE INDEX runs_by_backend ON runs (backend, status);
    "#,
    ),
    (
        11,
        // When the run last became queued: its request, or the loss of the attempt it is
        // retried after. What the queue's oldest wait is measured from, not `created_ms`.
        r#"
    ALTER TABLE runs ADD COLUMN queued_ms INTEGER;
    UPDATE runs SET queued_ms = created_ms;
    "#,
    ),
];

impl Store {
    pub(super) async fn migrate(&self) -> Result<()> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)")
            .execute(&self.pool)
            .await?;
        for (version, sql) in MIGRATIONS {
            let mut transaction = self.begin_immediate().await?;
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
}
