//! The DuckDB warehouse: embedded database files on the agent's disk.
//!
//! Layout under the configured root, per repository (by slug):
//! ```text
//! <slug>/deploys/<run id>/prod.duckdb   one per successful deploy (catalog `prod`)
//! <slug>/current -> deploys/<run id>    the live production database
//! <slug>/pr/<isolation>/pr.duckdb   one per pull request (catalog `pr`), in a directory of
//!                                   its own: the only one the PR's build may write to
//! ```
//! The profile never names these paths. Each run directory gets two links, `warehouse` (the
//! directory the build writes: the PR's, or the deploy's) and `production` (the production
//! database's directory, CI runs only), and the profile reaches the databases through them by
//! relative paths. So the profile, which dbt hashes to decide whether a saved parse can be
//! reused, is the same for every PR of a repository, and every PR can start from the parse
//! production's deploy made for CI builds (see `reuse`).
//! A deploy copies the current database into a new directory, builds there, and on success
//! swaps `current` with an atomic rename; readers of the old one are never disturbed, and a
//! failed deploy leaves production as it was. A PR database attaches the production database
//! of the deploy its run compares against, read-only, as catalog `prod`, so deferred refs resolve
//! to production and every write lands in the PR's own file.

use std::path::{Path, PathBuf};

use slimci_proto::{IsolationName, RepoName, RunId};

use super::{WarehouseError, io};

/// Production's catalog name in every DuckDB profile; deferred relations are `prod.<schema>.<name>`.
pub const PRODUCTION_CATALOG: &str = "prod";
/// A PR database's catalog name (its file is `pr.duckdb` in the PR's own directory).
pub const PR_CATALOG: &str = "pr";
/// The run directory's link to the directory the build writes its database in.
pub const WAREHOUSE_LINK: &str = "warehouse";
/// The run directory's link to the production database's directory (CI runs).
pub const PRODUCTION_LINK: &str = "production";

#[derive(Clone)]
pub struct DuckDbWarehouse {
    pub root: PathBuf,
    pub threads: u32,
    pub keep_deploys: usize,
    /// DuckDB settings that take a warehouse secret: (setting, environment variable). The
    /// profile reads each with `env_var`, so the value itself is never written to disk.
    pub secret_settings: Vec<(String, String)>,
}

/// What a run's profile points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DuckDbTarget {
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

    fn pr_file() -> String {
        format!("{PR_CATALOG}.duckdb")
    }

    /// Starts a deploy: a copy of the current production database (if any) in a new directory.
    pub fn begin_deploy(
        &self,
        repository: &RepoName,
        run: RunId,
    ) -> Result<DuckDbTarget, WarehouseError> {
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
        Ok(DuckDbTarget::Deploy { database })
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
    ) -> Result<DuckDbTarget, WarehouseError> {
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
        let pr_dir = self
            .repository_dir(repository)
            .join("pr")
            .join(isolation.as_str());
        std::fs::create_dir_all(&pr_dir).map_err(io(&pr_dir))?;
        let database = pr_dir.join(Self::pr_file());
        // Earlier layouts: `pr/<isolation>.duckdb`, then `pr/<isolation>/<isolation>.duckdb`.
        for old in [
            pr_dir.with_file_name(format!("{isolation}.duckdb")),
            pr_dir.join(format!("{isolation}.duckdb")),
        ] {
            if old.is_file() && !database.exists() {
                std::fs::rename(&old, &database).map_err(io(&old))?;
                let old_wal = old.with_extension("duckdb.wal");
                if old_wal.is_file() {
                    std::fs::rename(&old_wal, database.with_extension("duckdb.wal"))
                        .map_err(io(&old_wal))?;
                }
            }
        }
        Ok(DuckDbTarget::Ci {
            database,
            production,
        })
    }

    /// The target a deploy parses production's code against the way CI builds will
    /// (`job::seed`): the CI profile's shape, with the deploy's new database as production and
    /// a scratch directory of the run in place of a PR's database. Parsing opens neither.
    pub fn seed_target(run_dir: &Path, deploy: &DuckDbTarget) -> DuckDbTarget {
        let production = match deploy {
            DuckDbTarget::Deploy { database }
            | DuckDbTarget::Teardown { database }
            | DuckDbTarget::Ci {
                production: database,
                ..
            } => database.clone(),
        };
        DuckDbTarget::Ci {
            database: run_dir.join("seed-warehouse").join(Self::pr_file()),
            production,
        }
    }

    fn pr_dir(&self, repository: &RepoName, isolation: &IsolationName) -> PathBuf {
        self.repository_dir(repository)
            .join("pr")
            .join(isolation.as_str())
    }

    /// The PR's database file, if this runner has one.
    pub fn pr_database(&self, repository: &RepoName, isolation: &IsolationName) -> Option<PathBuf> {
        Some(self.pr_dir(repository, isolation).join(Self::pr_file())).filter(|path| path.is_file())
    }

    /// Removes the PR's directory with its database (and DuckDB's write-ahead log).
    pub fn remove_pr_database(
        &self,
        repository: &RepoName,
        isolation: &IsolationName,
    ) -> Result<(), WarehouseError> {
        let directory = self.pr_dir(repository, isolation);
        match std::fs::remove_dir_all(&directory) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(WarehouseError::Io {
                path: directory,
                source,
            }),
        }
    }

    /// The PR's own database, for a teardown, if this runner has one.
    pub fn teardown_target(
        &self,
        repository: &RepoName,
        isolation: &IsolationName,
    ) -> Option<DuckDbTarget> {
        self.pr_database(repository, isolation)
            .map(|database| DuckDbTarget::Teardown { database })
    }

    /// The directory a build may write: the deploy's own, or the PR's own.
    pub fn writable_dir(target: &DuckDbTarget) -> &Path {
        match target {
            DuckDbTarget::Deploy { database }
            | DuckDbTarget::Ci { database, .. }
            | DuckDbTarget::Teardown { database } => database.parent().unwrap_or(database),
        }
    }

    /// Makes the run directory's links to the target's databases (see the module docs).
    pub fn link(run_dir: &Path, target: &DuckDbTarget) -> Result<(), WarehouseError> {
        let mut links = vec![(WAREHOUSE_LINK, Self::writable_dir(target))];
        if let DuckDbTarget::Ci { production, .. } = target {
            links.push((PRODUCTION_LINK, production.parent().unwrap_or(production)));
        }
        for (name, destination) in links {
            let link = run_dir.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(destination, &link).map_err(io(&link))?;
        }
        Ok(())
    }

    /// The profile's output for `target`. Databases are reached through the run directory's
    /// links: `up` leads from the project directory (dbt's working directory) back to the run
    /// directory, e.g. `../`.
    pub fn profile_output(&self, target: &DuckDbTarget, up: &str) -> serde_json::Value {
        let file_name = |path: &Path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut output = match target {
            DuckDbTarget::Deploy { database } | DuckDbTarget::Teardown { database } => {
                serde_json::json!({
                    "type": "duckdb",
                    "path": format!("{up}{WAREHOUSE_LINK}/{}", file_name(database)),
                    "threads": self.threads,
                })
            }
            DuckDbTarget::Ci {
                database,
                production,
            } => serde_json::json!({
                "type": "duckdb",
                "path": format!("{up}{WAREHOUSE_LINK}/{}", file_name(database)),
                "threads": self.threads,
                "attach": [{
                    "path": format!("{up}{PRODUCTION_LINK}/{}", file_name(production)),
                    "alias": PRODUCTION_CATALOG,
                    "read_only": true,
                }],
            }),
        };
        if !self.secret_settings.is_empty() {
            let settings: serde_json::Map<String, serde_json::Value> = self
                .secret_settings
                .iter()
                .map(|(setting, variable)| {
                    (
                        setting.clone(),
                        serde_json::Value::String(format!("{{{{ env_var('{variable}') }}}}")),
                    )
                })
                .collect();
            output["settings"] = serde_json::Value::Object(settings);
        }
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warehouse::{Target, Warehouse, referenced_variables};
    use slimci_proto::PrNumber;

    fn profile_yaml(warehouse: DuckDbWarehouse, target: &DuckDbTarget) -> String {
        Warehouse::DuckDb(warehouse).profile_yaml("shop", &Target::DuckDb(target.clone()), "../")
    }

    fn warehouse(root: &Path) -> DuckDbWarehouse {
        DuckDbWarehouse {
            root: root.to_owned(),
            threads: 2,
            keep_deploys: 1,
            secret_settings: Vec::new(),
        }
    }

    #[test]
    fn deploys_copy_then_swap_and_failures_leave_production_alone() {
        let root = tempfile::tempdir().unwrap();
        let warehouse = warehouse(root.path());
        let repo = RepoName::parse("shop").unwrap();
        let first = RunId::new();
        let DuckDbTarget::Deploy { database } = warehouse.begin_deploy(&repo, first).unwrap()
        else {
            panic!()
        };
        std::fs::write(&database, "v1").unwrap();
        warehouse.publish_deploy(&repo, first).unwrap();
        let current = root.path().join("shop/current/prod.duckdb");
        assert_eq!(std::fs::read_to_string(&current).unwrap(), "v1");

        let failed = RunId::new();
        let DuckDbTarget::Deploy { database } = warehouse.begin_deploy(&repo, failed).unwrap()
        else {
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
        let DuckDbTarget::Deploy { database } = warehouse.begin_deploy(&repo, second).unwrap()
        else {
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
        let DuckDbTarget::Ci {
            database,
            production,
        } = &target
        else {
            panic!()
        };
        assert!(database.ends_with("shop/pr/pr_shop_5/pr.duckdb"));
        assert_eq!(
            DuckDbWarehouse::writable_dir(&target),
            root.path().join("shop/pr/pr_shop_5")
        );
        assert!(production.ends_with(format!("shop/deploys/{deploy}/prod.duckdb")));
        let yaml = profile_yaml(warehouse.clone(), &target);
        assert!(yaml.contains("alias: prod"), "{yaml}");
        assert!(yaml.contains("read_only: true"), "{yaml}");
        assert!(yaml.contains("target: ci"), "{yaml}");
        assert!(yaml.contains("path: ../warehouse/pr.duckdb"), "{yaml}");
        assert!(yaml.contains("path: ../production/prod.duckdb"), "{yaml}");
        assert!(referenced_variables(&yaml).is_empty());

        // Another PR, another production: the same profile, so dbt's saved parse carries over.
        let other = IsolationName::for_pr(&repo, PrNumber(6));
        let second = RunId::new();
        warehouse.begin_deploy(&repo, second).unwrap();
        let other_target = warehouse.ci_target(&repo, &other, second).unwrap();
        assert_ne!(other_target, target);
        assert_eq!(profile_yaml(warehouse.clone(), &other_target), yaml);

        // The run directory's links lead to this PR's directory and this production.
        let run_dir = tempfile::tempdir().unwrap();
        DuckDbWarehouse::link(run_dir.path(), &target).unwrap();
        assert_eq!(
            std::fs::read_link(run_dir.path().join("warehouse")).unwrap(),
            root.path().join("shop/pr/pr_shop_5")
        );
        assert_eq!(
            std::fs::read_to_string(run_dir.path().join("production/prod.duckdb")).unwrap(),
            "v1"
        );
    }

    #[test]
    fn secrets_reach_the_profile_only_as_env_var_references() {
        let root = tempfile::tempdir().unwrap();
        let mut warehouse = warehouse(root.path());
        warehouse.secret_settings =
            vec![("http_proxy_password".into(), "DBT_ENV_SECRET_PROXY".into())];
        let target = DuckDbTarget::Deploy {
            database: root.path().join("prod.duckdb"),
        };
        let yaml = profile_yaml(warehouse.clone(), &target);
        assert!(
            yaml.contains("http_proxy_password: '{{ env_var(''DBT_ENV_SECRET_PROXY'') }}'"),
            "{yaml}"
        );
        assert_eq!(referenced_variables(&yaml), ["DBT_ENV_SECRET_PROXY"]);
        assert_eq!(
            referenced_variables("a: \"{{ env_var( \"X\", 'd') }}\" env_var(broken"),
            ["X"]
        );
    }

    #[test]
    fn pr_databases_move_into_their_own_directory() {
        let root = tempfile::tempdir().unwrap();
        let warehouse = warehouse(root.path());
        let repo = RepoName::parse("shop").unwrap();
        let deploy = RunId::new();
        warehouse.begin_deploy(&repo, deploy).unwrap();
        std::fs::write(
            root.path()
                .join(format!("shop/deploys/{deploy}/prod.duckdb")),
            "p",
        )
        .unwrap();
        std::fs::create_dir_all(root.path().join("shop/pr")).unwrap();
        std::fs::write(root.path().join("shop/pr/pr_shop_9.duckdb"), "oldest").unwrap();
        let isolation = IsolationName::for_pr(&repo, PrNumber(9));
        let DuckDbTarget::Ci { database, .. } =
            warehouse.ci_target(&repo, &isolation, deploy).unwrap()
        else {
            panic!()
        };
        assert_eq!(std::fs::read_to_string(database).unwrap(), "oldest");
        assert!(!root.path().join("shop/pr/pr_shop_9.duckdb").exists());

        std::fs::create_dir_all(root.path().join("shop/pr/pr_shop_8")).unwrap();
        std::fs::write(
            root.path().join("shop/pr/pr_shop_8/pr_shop_8.duckdb"),
            "old",
        )
        .unwrap();
        std::fs::write(
            root.path().join("shop/pr/pr_shop_8/pr_shop_8.duckdb.wal"),
            "w",
        )
        .unwrap();
        let isolation = IsolationName::for_pr(&repo, PrNumber(8));
        let DuckDbTarget::Ci { database, .. } =
            warehouse.ci_target(&repo, &isolation, deploy).unwrap()
        else {
            panic!()
        };
        assert!(database.ends_with("pr_shop_8/pr.duckdb"));
        assert_eq!(std::fs::read_to_string(&database).unwrap(), "old");
        assert_eq!(
            std::fs::read_to_string(database.with_extension("duckdb.wal")).unwrap(),
            "w"
        );
    }
}
