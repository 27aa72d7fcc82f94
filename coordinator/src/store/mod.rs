//! All durable state, in SQLite (WAL) through sqlx. Every query the coordinator makes lives in
//! this module, so a PostgreSQL store for HA replaces this one directory. Logs and artifact
//! bytes live on disk beside the database (see `logs` and `artifacts`); this module holds their
//! metadata. The store decides nothing about a run's fate: it asks `rules` and executes the
//! answer, in one transaction where it read what the rules judged.
//!
//! `mod.rs`: the `Store` handle, `open`, `StoreError`, `begin_immediate`. `schema`: the
//! migrations. `rows`: the row types and their decoders. By subject: `runs` (inserting, reading,
//! cancelling, superseding), `outbox` (what the publisher dispatches), `events` (agent events
//! and a run's finish), `leases` (claims, leases, lost attempts), `production` (production
//! state: stamping, promoting, publishing), `github` (webhook deliveries, pull requests,
//! comments, reported statuses, sweep candidates).
//!
//! Times are Unix milliseconds (`*_ms`).

mod cloud;
mod events;
mod github;
mod leases;
mod outbox;
mod pages;
mod production;
mod rows;
mod runs;
mod schema;
#[cfg(test)]
pub(crate) mod testing;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

pub use cloud::DBT_CLOUD_AGENT;
pub use events::Applied;
pub use pages::{NodeCount, NodeFilter, NodePage, PageFilter, PullRequestRuns};
pub use production::Publish;
pub use rows::{
    ArtifactRecord, NewRun, PhaseRecord, ProductionStamp, ProductionState, PullRequest, Run,
    RunFilter, SweepCandidate, phase_order,
};
pub use runs::Supersession;

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

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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

    /// Begins a transaction that reads, then writes. IMMEDIATE takes the write lock at the
    /// start (waiting with the busy timeout), not on the first write, where a concurrent writer
    /// would fail it with SQLITE_BUSY at once.
    async fn begin_immediate(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{new_run, store};
    use super::*;
    use crate::rules::RunStatus;
    use slimci_proto::RunKind;

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
}
