//! Where dbt builds, and the dbt profile for each run.
//!
//! DuckDB layout under the configured root, per repository (by slug):
//! ```text
//! <slug>/deploys/<run id>/prod.duckdb   one per successful deploy (catalog `prod`)
//! <slug>/current -> deploys/<run id>    the live production database
//! <slug>/pr/<isolation>.duckdb          one per pull request (catalog = isolation name)
//! ```
//! A deploy copies the current database into a new directory, builds there, and on success
//! swaps `current` with an atomic rename; readers of the old one are never disturbed, and a
//! failed deploy leaves production as it was. A PR database attaches the production database
//! of the deploy its run compares against, read-only, as catalog `prod`, so deferred refs resolve
//! to production and every write lands in the PR's own file.

use std::path::{Path, PathBuf};

use slimci_proto::{IsolationName, RepoName, RunId};

/// Production's catalog name in every DuckDB profile; deferred relations are `prod.<schema>.<name>`.
pub const PRODUCTION_CATALOG: &str = "prod";

#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    #[error("warehouse {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this runner has no production database for repository `{repository}` (looked in {looked}); agents that build one repository must share the DuckDB warehouse root"
    )]
    NoProduction { repository: String, looked: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WarehouseError + '_ {
    move |source| WarehouseError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct DuckDbWarehouse {
    pub root: PathBuf,
    pub threads: u32,
    pub keep_deploys: usize,
}

/// What a run's profile points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Deploy {
        database: PathBuf,
    },
    /// The PR's own database, nothing attached: a teardown empties it.
    Teardown {
        database: PathBuf,
    },
    Ci {
        database: PathBuf,
        production: PathBuf,
    },
}

impl DuckDbWarehouse {
    fn repository_dir(&self, repository: &RepoName) -> PathBuf {
        self.root.join(repository.slug())
    }

    fn deploy_dir(&self, repository: &RepoName, run: RunId) -> PathBuf {
        self.repository_dir(repository)
            .join("deploys")
            .join(run.to_string())
    }

    fn database_file() -> String {
        format!("{PRODUCTION_CATALOG}.duckdb")
    }

    /// Starts a deploy: a copy of the current production database (if any) in a new directory.
    pub fn begin_deploy(
        &self,
        repository: &RepoName,
        run: RunId,
    ) -> Result<Target, WarehouseError> {
        let directory = self.deploy_dir(repository, run);
        if directory.exists() {
            std::fs::remove_dir_all(&directory).map_err(io(&directory))?;
        }
        std::fs::create_dir_all(&directory).map_err(io(&directory))?;
        let database = directory.join(Self::database_file());
        let current = self
            .repository_dir(repository)
            .join("current")
            .join(Self::database_file());
        if current.is_file() {
            std::fs::copy(&current, &database).map_err(io(&current))?;
        }
        Ok(Target::Deploy { database })
    }

    /// Makes a successful deploy the live production database, then prunes old ones.
    pub fn publish_deploy(&self, repository: &RepoName, run: RunId) -> Result<(), WarehouseError> {
        let repository_dir = self.repository_dir(repository);
        let link = repository_dir.join("current");
        let staged = repository_dir.join(format!(".current.{run}"));
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(Path::new("deploys").join(run.to_string()), &staged)
            .map_err(io(&staged))?;
        std::fs::rename(&staged, &link).map_err(io(&link))?;
        self.prune(repository, run);
        Ok(())
    }

    /// Removes a failed deploy's copy; production is untouched.
    pub fn discard_deploy(&self, repository: &RepoName, run: RunId) {
        let directory = self.deploy_dir(repository, run);
        if let Err(error) = std::fs::remove_dir_all(&directory) {
            tracing::warn!(%error, path = %directory.display(), "could not remove a failed deploy's database");
        }
    }

    fn prune(&self, repository: &RepoName, current: RunId) {
        let deploys = self.repository_dir(repository).join("deploys");
        let Ok(entries) = std::fs::read_dir(&deploys) else {
            return;
        };
        // Run ids are UUIDv7: their text order is their creation order.
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            // Newer ones may be deploys still building.
            .filter(|name| RunId::parse(name).is_ok() && *name < current.to_string())
            .collect();
        names.sort();
        let excess = names.len().saturating_sub(self.keep_deploys);
        for name in &names[..excess] {
            let _ = std::fs::remove_dir_all(deploys.join(name));
        }
    }

    /// The PR's own database, attaching the production database of `deploy_run`, or the
    /// current one if that deploy's copy was pruned.
    pub fn ci_target(
        &self,
        repository: &RepoName,
        isolation: &IsolationName,
        deploy_run: RunId,
    ) -> Result<Target, WarehouseError> {
        let exact = self
            .deploy_dir(repository, deploy_run)
            .join(Self::database_file());
        let current = self
            .repository_dir(repository)
            .join("current")
            .join(Self::database_file());
        let production = if exact.is_file() {
            exact
        } else if current.is_file() {
            tracing::warn!(%deploy_run, "that deploy's database was pruned; deferring to the current one");
            current
        } else {
            return Err(WarehouseError::NoProduction {
                repository: repository.to_string(),
                looked: format!("{} and {}", exact.display(), current.display()),
            });
        };
        let database = self.pr_database_path(repository, isolation);
        let pr_dir = database
            .parent()
            .expect("a PR database lives in a directory");
        std::fs::create_dir_all(pr_dir).map_err(io(pr_dir))?;
        Ok(Target::Ci {
            database,
            production,
        })
    }

    fn pr_database_path(&self, repository: &RepoName, isolation: &IsolationName) -> PathBuf {
        self.repository_dir(repository)
            .join("pr")
            .join(format!("{isolation}.duckdb"))
    }

    /// The PR's database file, if this runner has one.
    pub fn pr_database(&self, repository: &RepoName, isolation: &IsolationName) -> Option<PathBuf> {
        Some(self.pr_database_path(repository, isolation)).filter(|path| path.is_file())
    }

    /// Removes the PR's database file (and DuckDB's write-ahead log beside it).
    pub fn remove_pr_database(
        &self,
        repository: &RepoName,
        isolation: &IsolationName,
    ) -> Result<(), WarehouseError> {
        let path = self.pr_database_path(repository, isolation);
        for file in [path.clone(), path.with_extension("duckdb.wal")] {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(WarehouseError::Io { path: file, source }),
            }
        }
        Ok(())
    }

    /// The `profiles.yml` text for `profile_name` with a single output named after the target.
    pub fn profile_yaml(&self, profile_name: &str, target: &Target) -> String {
        let output = match target {
            Target::Deploy { database } | Target::Teardown { database } => serde_json::json!({
                "type": "duckdb",
                "path": database,
                "threads": self.threads,
            }),
            Target::Ci {
                database,
                production,
            } => serde_json::json!({
                "type": "duckdb",
                "path": database,
                "threads": self.threads,
                "attach": [{ "path": production, "alias": PRODUCTION_CATALOG, "read_only": true }],
            }),
        };
        let target_name = match target {
            Target::Deploy { .. } => "prod",
            Target::Ci { .. } | Target::Teardown { .. } => "ci",
        };
        let profile = serde_json::json!({
            profile_name: { "target": target_name, "outputs": { target_name: output } }
        });
        serde_yaml::to_string(&profile).expect("profile serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimci_proto::PrNumber;

    fn warehouse(root: &Path) -> DuckDbWarehouse {
        DuckDbWarehouse {
            root: root.to_owned(),
            threads: 2,
            keep_deploys: 1,
        }
    }

    #[test]
    fn deploys_copy_then_swap_and_failures_leave_production_alone() {
        let root = tempfile::tempdir().unwrap();
        let warehouse = warehouse(root.path());
        let repo = RepoName::parse("shop").unwrap();
        let first = RunId::new();
        let Target::Deploy { database } = warehouse.begin_deploy(&repo, first).unwrap() else {
            panic!()
        };
        std::fs::write(&database, "v1").unwrap();
        warehouse.publish_deploy(&repo, first).unwrap();
        let current = root.path().join("shop/current/prod.duckdb");
        assert_eq!(std::fs::read_to_string(&current).unwrap(), "v1");

        let failed = RunId::new();
        let Target::Deploy { database } = warehouse.begin_deploy(&repo, failed).unwrap() else {
            panic!()
        };
        assert_eq!(
            std::fs::read_to_string(&database).unwrap(),
            "v1",
            "a deploy starts from production"
        );
        std::fs::write(&database, "broken").unwrap();
        warehouse.discard_deploy(&repo, failed);
        assert_eq!(std::fs::read_to_string(&current).unwrap(), "v1");

        let second = RunId::new();
        let Target::Deploy { database } = warehouse.begin_deploy(&repo, second).unwrap() else {
            panic!()
        };
        std::fs::write(&database, "v2").unwrap();
        warehouse.publish_deploy(&repo, second).unwrap();
        assert_eq!(std::fs::read_to_string(&current).unwrap(), "v2");
        // keep_deploys = 1: the first deploy is kept as the one older copy.
        assert!(root.path().join(format!("shop/deploys/{first}")).exists());
    }

    #[test]
    fn ci_attaches_the_production_it_compares_against() {
        let root = tempfile::tempdir().unwrap();
        let warehouse = warehouse(root.path());
        let repo = RepoName::parse("shop").unwrap();
        let isolation = IsolationName::for_pr(&repo, PrNumber(5));
        assert!(matches!(
            warehouse.ci_target(&repo, &isolation, RunId::new()),
            Err(WarehouseError::NoProduction { .. })
        ));
        let deploy = RunId::new();
        warehouse.begin_deploy(&repo, deploy).unwrap();
        std::fs::write(
            root.path()
                .join(format!("shop/deploys/{deploy}/prod.duckdb")),
            "v1",
        )
        .unwrap();
        warehouse.publish_deploy(&repo, deploy).unwrap();
        let target = warehouse.ci_target(&repo, &isolation, deploy).unwrap();
        let Target::Ci {
            database,
            production,
        } = &target
        else {
            panic!()
        };
        assert!(database.ends_with("shop/pr/pr_shop_5.duckdb"));
        assert!(production.ends_with(format!("shop/deploys/{deploy}/prod.duckdb")));
        let yaml = warehouse.profile_yaml("shop", &target);
        assert!(yaml.contains("alias: prod"), "{yaml}");
        assert!(yaml.contains("read_only: true"), "{yaml}");
        assert!(yaml.contains("target: ci"), "{yaml}");
    }
}
