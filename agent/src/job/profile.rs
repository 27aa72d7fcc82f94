//! The profile phase: the warehouse target of the job's kind (a deploy's copy of production,
//! the PR's own database), linked into the run directory, and the dbt profile pointing at it,
//! written under the name `dbt_project.yml` asks for. Only the secrets that profile reads will
//! reach dbt.

use std::path::{Component, Path, PathBuf};

use slimci_proto::{IsolationName, JobKind};

use crate::job::attempt_run::AttemptRun;
use crate::job::stop::Stop;
use crate::sandbox::SandboxError;
use crate::warehouse::{DuckDbWarehouse, Target, WarehouseError};

/// Why the profile could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read dbt_project.yml: {0}")]
    ProjectUnreadable(#[source] std::io::Error),
    #[error("dbt_project.yml is not valid YAML: {0}")]
    ProjectNotYaml(#[source] serde_yaml::Error),
    #[error("dbt_project.yml names no `profile`; slimci writes that profile for each run")]
    NoProfileName,
    #[error("{0} does not exist on this runner")]
    NoIsolation(IsolationName),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// The profile written for an attempt, and the target it points at.
pub struct WrittenProfile {
    pub target: Target,
    /// The profile's text (part of the parse key).
    pub text: String,
}

/// The profile name a project's `dbt_project.yml` asks for.
pub fn profile_name(project_file: &Path) -> Result<String, ProfileError> {
    let text = std::fs::read_to_string(project_file).map_err(ProfileError::ProjectUnreadable)?;
    let project: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(ProfileError::ProjectNotYaml)?;
    project
        .get("profile")
        .and_then(serde_yaml::Value::as_str)
        .map(str::to_owned)
        .ok_or(ProfileError::NoProfileName)
}

/// From a project directory (`src/<project_dir>`) back up to its run directory: `../`, or
/// `../../../` for a project in `analytics/dbt`.
pub fn up_to_run_dir(project_dir: &str) -> String {
    let depth = Path::new(project_dir)
        .components()
        .filter(|part| matches!(part, Component::Normal(_)))
        .count();
    "../".repeat(depth + 1)
}

impl AttemptRun<'_> {
    /// Prepares the job's target and writes the profile for it.
    pub fn write_profile(&mut self, project: &Path) -> Result<WrittenProfile, Stop> {
        let name = profile_name(&project.join("dbt_project.yml"))
            .map_err(|error| Stop::error(error.to_string()))?;
        let target = self
            .target()
            .map_err(|error| Stop::error(error.to_string()))?;
        let profile = self.services.warehouse.profile_yaml(
            &name,
            &target,
            &up_to_run_dir(&self.job.project_dir),
        );
        if let Err(error) = self.write_profile_files(&target, &profile) {
            self.discard(&target);
            return Err(Stop::error(error.to_string()));
        }
        self.profile_secrets = self.secrets_read_by(&profile);
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
        Ok(WrittenProfile {
            target,
            text: profile,
        })
    }

    /// The secrets `profile` reads, as dbt gets them: only those reach dbt.
    pub fn secrets_read_by(&self, profile: &str) -> Vec<(String, String)> {
        let referenced = DuckDbWarehouse::referenced_variables(profile);
        self.services
            .secrets
            .warehouse
            .iter()
            .filter(|secret| referenced.contains(&secret.env_name()))
            .map(|secret| (secret.env_name(), secret.value.clone()))
            .collect()
    }

    /// The warehouse target of the job's kind.
    fn target(&self) -> Result<Target, ProfileError> {
        let (warehouse, repository) = (&self.services.warehouse, &self.job.repository);
        Ok(match &self.job.kind {
            JobKind::Deploy => warehouse.begin_deploy(repository, self.job.run_id)?,
            JobKind::Teardown { isolation, .. } => warehouse
                .teardown_target(repository, isolation)
                .ok_or_else(|| ProfileError::NoIsolation(isolation.clone()))?,
            JobKind::Ci {
                isolation,
                production_state,
                ..
            } => warehouse.ci_target(repository, isolation, production_state.deploy_run_id)?,
        })
    }

    /// Links the target into the run directory, writes the profile, and gives both to the
    /// build user.
    pub fn write_profile_files(&self, target: &Target, profile: &str) -> Result<(), ProfileError> {
        let path = self.run_dir.join("profiles").join("profiles.yml");
        DuckDbWarehouse::link(&self.run_dir, target)?;
        std::fs::write(&path, profile).map_err(|source| ProfileError::Write {
            path: path.clone(),
            source,
        })?;
        self.services.sandbox.hand_over(&path)?;
        self.services
            .sandbox
            .hand_over(DuckDbWarehouse::writable_dir(target))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_name_comes_from_the_project() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dbt_project.yml");
        std::fs::write(&path, "name: shop\nprofile: shop_profile\n").unwrap();
        assert_eq!(profile_name(&path).unwrap(), "shop_profile");
        std::fs::write(&path, "name: shop\n").unwrap();
        let error = profile_name(&path).unwrap_err();
        assert!(matches!(error, ProfileError::NoProfileName));
        assert!(error.to_string().contains("names no `profile`"));
        std::fs::write(&path, "name: [shop\n").unwrap();
        assert!(matches!(
            profile_name(&path),
            Err(ProfileError::ProjectNotYaml(_))
        ));
    }

    #[test]
    fn the_profile_reaches_the_run_directory_from_any_project_dir() {
        assert_eq!(up_to_run_dir(""), "../");
        assert_eq!(up_to_run_dir("analytics/dbt"), "../../../");
    }
}
