//! The profile phase: the warehouse target of the job's kind (DuckDB: a deploy's copy of
//! production or the PR's own database, linked into the run directory; a server: production's
//! schema or the PR's), and the dbt profile pointing at it, written under the name
//! `dbt_project.yml` asks for. Only the secrets that profile reads will reach dbt.

use std::path::{Component, Path, PathBuf};

use crate::config::SNOWFLAKE_PRIVATE_KEY;
use crate::job::attempt_run::AttemptRun;
use crate::job::stop::Stop;
use crate::sandbox::SandboxError;
use crate::warehouse::{
    DuckDbTarget, DuckDbWarehouse, KEY_FILE, Target, WarehouseError, referenced_variables,
    writable_dir,
};

/// Why the profile could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read dbt_project.yml: {0}")]
    ProjectUnreadable(#[source] std::io::Error),
    #[error("dbt_project.yml is not valid YAML: {0}")]
    ProjectNotYaml(#[source] serde_yaml::Error),
    #[error("dbt_project.yml names no `profile`; slimci writes that profile for each run")]
    NoProfileName,
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
            .services
            .warehouse
            .target(self.job)
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
        if let Some(directory) = writable_dir(&target) {
            self.paths.write.push(directory.to_owned());
        }
        if let Target::DuckDb(DuckDbTarget::Ci { production, .. }) = &target
            && let Some(directory) = production.parent()
        {
            self.paths.read.push(directory.to_owned());
        }
        self.log.slimci(target.describe());
        Ok(WrittenProfile {
            target,
            text: profile,
        })
    }

    /// Writes the Snowflake private key into the run directory (`KEY_FILE`), readable by the
    /// build user alone; it goes with the run directory when the attempt ends.
    fn write_key_file(&self) -> Result<(), ProfileError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = self.run_dir.join(KEY_FILE);
        let key = self
            .services
            .secrets
            .warehouse
            .iter()
            .find(|secret| secret.name == SNOWFLAKE_PRIVATE_KEY)
            .map(|secret| secret.value.as_bytes())
            .unwrap_or_default();
        let write = |path: &Path| -> std::io::Result<()> {
            if let Some(directory) = path.parent() {
                std::fs::create_dir_all(directory)?;
                std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(path)?;
            std::io::Write::write_all(&mut file, key)
        };
        write(&path).map_err(|source| ProfileError::Write {
            path: path.clone(),
            source,
        })?;
        if let Some(directory) = path.parent() {
            self.services.sandbox.hand_over(directory)?;
        }
        Ok(())
    }

    /// The secrets `profile` reads, as dbt gets them: only those reach dbt.
    pub fn secrets_read_by(&self, profile: &str) -> Vec<(String, String)> {
        let referenced = referenced_variables(profile);
        self.services
            .secrets
            .warehouse
            .iter()
            .filter(|secret| referenced.contains(&secret.env_name()))
            .map(|secret| (secret.env_name(), secret.value.clone()))
            .collect()
    }

    /// Links a DuckDB target into the run directory, writes the profile, and gives both to the
    /// build user.
    pub fn write_profile_files(&self, target: &Target, profile: &str) -> Result<(), ProfileError> {
        let path = self.run_dir.join("profiles").join("profiles.yml");
        if let Target::DuckDb(target) = target {
            DuckDbWarehouse::link(&self.run_dir, target)?;
        }
        if self.services.warehouse.needs_key_file() {
            self.write_key_file()?;
        }
        std::fs::write(&path, profile).map_err(|source| ProfileError::Write {
            path: path.clone(),
            source,
        })?;
        self.services.sandbox.hand_over(&path)?;
        if let Some(directory) = writable_dir(target) {
            self.services.sandbox.hand_over(directory)?;
        }
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
