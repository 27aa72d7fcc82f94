//! The checkout phase: the job's commit from the git cache into the run's `src/`, and the dbt
//! project found in it.

use std::path::{Component, Path, PathBuf};

use slimci_proto::EventBody;

use crate::git::GitError;
use crate::job::attempt_run::AttemptRun;
use crate::job::stop::Stop;

impl AttemptRun<'_> {
    /// Checks out the commit and returns the dbt project's directory in it.
    pub async fn checkout(&mut self) -> Result<PathBuf, Stop> {
        let (repository, clone_url, git_target) = (
            self.job.repository.clone(),
            self.job.clone_url.clone(),
            self.job.git.clone(),
        );
        let git = self.services.git.clone();
        let source = self.run_dir.join("src");
        let started = std::time::Instant::now();
        let destination = source.clone();
        let checked_out = tokio::task::spawn_blocking(move || {
            let (sha, fetched) = git.prepare(&repository, &clone_url, &git_target)?;
            let files = git.checkout(&repository, &sha, &destination)?;
            Ok::<_, GitError>((sha, fetched, files))
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
                .any(|part| matches!(part, Component::ParentDir))
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
}
