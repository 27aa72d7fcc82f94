//! The seed-parse phase of a deploy that built: production's code parsed the way CI builds
//! will parse it (`dbt parse` with the CI profile, which is the same for every PR), published
//! as an artifact of the deploy (`reuse::seed_artifact_name`) and saved in this agent's parse
//! cache. A CI build comparing against this deploy starts from that parse, so dbt reparses only
//! the files its PR changed. This is the only way a parse for CI builds gets into any cache: a
//! PR build never saves one (`reuse`).
//!
//! A seed that cannot be made is logged and skipped: the deploy stands, and CI builds parse the
//! whole project. A cancel or the run's timeout still stops the deploy.

use std::path::Path;

use crate::job::attempt_run::AttemptRun;
use crate::job::dbt::DbtStart;
use crate::job::parse_cache::ParseFor;
use crate::job::profile::{profile_name, up_to_run_dir};
use crate::job::stop::Stop;
use crate::process::Exit;
use crate::reuse;
use crate::warehouse::{Target, writable_dir};

impl AttemptRun<'_> {
    /// Parses production's code for CI builds and publishes the parse; `deploy` is the target
    /// the deploy built. Returns whether a parse was made.
    pub async fn seed_parse(&mut self, project: &Path, deploy: &Target) -> Result<bool, Stop> {
        let profile = match self.write_seed_profile(project, deploy) {
            Ok(profile) => profile,
            Err(error) => {
                self.log
                    .slimci(format_args!("no parse for CI builds: {error}"));
                return Ok(false);
            }
        };
        let key = self.parse_key(
            project,
            &ParseFor {
                target: "ci",
                profile: &profile,
            },
        );
        let target_path = self.run_dir.join("target-seed");
        let args = vec![
            "parse".to_owned(),
            "--target".to_owned(),
            "ci".to_owned(),
            "--target-path".to_owned(),
            target_path.display().to_string(),
            "--log-format".to_owned(),
            "json".to_owned(),
        ];
        self.log.slimci(format_args!(
            "parsing production's code for CI builds: dbt {}",
            args.join(" ")
        ));
        let ran = self.dbt(project, args, DbtStart::Cold).await?.ran;
        match ran.exit {
            Exit::Code(0) => {}
            Exit::TimedOut | Exit::Cancelled => {
                return Err(Stop::for_dbt(&ran, "dbt parse", self.job.timeout));
            }
            _ => {
                let stop = Stop::for_dbt(&ran, "dbt parse", self.job.timeout);
                self.log
                    .slimci(format_args!("no parse for CI builds: {}", stop.message));
                return Ok(false);
            }
        }
        let bytes = match tokio::fs::read(target_path.join(reuse::PARTIAL_PARSE_FILE)).await {
            Ok(bytes) => bytes,
            Err(error) => {
                self.log.slimci(format_args!(
                    "no parse for CI builds: dbt parse wrote no {}: {error}",
                    reuse::PARTIAL_PARSE_FILE
                ));
                return Ok(false);
            }
        };
        let name = reuse::seed_artifact_name(&key);
        match self
            .services
            .coordinator
            .upload_artifact(self.job.run_id, &name, bytes.clone())
            .await
        {
            Ok(()) => self.log.slimci(format_args!(
                "published production's parse for CI builds as {name} ({:.1} MB)",
                bytes.len() as f64 / 1e6
            )),
            Err(error) => self.log.slimci(format_args!(
                "could not publish production's parse for CI builds: {error}; only this agent keeps it"
            )),
        }
        let (cache, deploy_run) = (self.services.cache.clone(), self.job.run_id);
        let saved =
            crate::cache::blocking(move || reuse::save_parse(&cache, &key, &bytes, deploy_run))
                .await;
        if let Err(error) = saved {
            self.log
                .slimci(format_args!("parse for CI builds not cached: {error}"));
        }
        Ok(true)
    }

    /// Writes the CI profile in place of the deploy's (whose build is done), with the run's
    /// links pointing where a CI build's would: production at the deploy's new database, the
    /// PR's database at a scratch directory. Returns the profile's text.
    fn write_seed_profile(&mut self, project: &Path, deploy: &Target) -> Result<String, String> {
        let name =
            profile_name(&project.join("dbt_project.yml")).map_err(|error| error.to_string())?;
        let warehouse = &self.services.warehouse;
        let target = warehouse.seed_target(&self.run_dir, deploy).ok_or_else(|| {
            format!(
                "on a {} warehouse each PR's profile names its own schema, so no parse carries over between PRs",
                warehouse.type_name()
            )
        })?;
        if let Some(scratch) = writable_dir(&target) {
            std::fs::create_dir_all(scratch)
                .map_err(|error| format!("cannot create {}: {error}", scratch.display()))?;
        }
        let profile = warehouse.profile_yaml(&name, &target, &up_to_run_dir(&self.job.project_dir));
        self.write_profile_files(&target, &profile)
            .map_err(|error| error.to_string())?;
        self.profile_secrets = self.secrets_read_by(&profile);
        Ok(profile)
    }
}
