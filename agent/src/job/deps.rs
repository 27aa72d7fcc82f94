//! The deps phase (only for a project with `packages.yml` or `dependencies.yml`): the
//! project's packages restored from the packages cache when a deploy cached the same package
//! files, otherwise installed by `dbt deps`; a deploy then caches them (a PR never writes the
//! cache: `reuse`).

use std::path::Path;

use crate::cache::blocking;
use crate::job::attempt_run::AttemptRun;
use crate::job::dbt::DbtStart;
use crate::job::stop::Stop;
use crate::process::Exit;
use slimci_proto::JobKind;

use crate::reuse;

/// Whether the project has packages to install.
pub fn has_packages(project: &Path) -> bool {
    project.join("packages.yml").is_file() || project.join("dependencies.yml").is_file()
}

impl AttemptRun<'_> {
    /// Installs the project's packages.
    pub async fn deps(&mut self, project: &Path) -> Result<(), Stop> {
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
                DbtStart::Cold,
            )
            .await?
            .ran;
        if ran.exit != Exit::Code(0) {
            return Err(Stop::for_dbt(&ran, "dbt deps", self.job.timeout));
        }
        self.caches.deps = Some("installed".to_owned());
        if !matches!(self.job.kind, JobKind::Deploy) {
            if cacheable {
                self.log.slimci(
                    "packages not cached: only deploys write the packages cache, never a PR build",
                );
            }
            return Ok(());
        }
        if cacheable && let Some(install) = install {
            let cache = self.services.cache.clone();
            let (project_dir, deploy) = (project.to_owned(), self.job.run_id);
            let saved =
                blocking(move || reuse::save_deps(&cache, &key, &project_dir, &install, deploy))
                    .await
                    .unwrap_or_else(|error| Some(error.to_string()));
            if let Some(reason) = saved {
                self.log
                    .slimci(format_args!("packages not cached: {reason}"));
            }
        }
        Ok(())
    }
}
