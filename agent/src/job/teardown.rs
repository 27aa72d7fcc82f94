//! A teardown attempt: drops a closed PR's isolation through dbt (`run-operation` with the
//! macro in `teardown.sql`, written into the project's first macro directory, so it works on
//! every adapter), then removes what is left of it on disk.

use std::path::Path;

use slimci_proto::{IsolationName, Outcome, Phase, RunResult};

use crate::job::attempt_run::AttemptRun;
use crate::job::dbt::DbtStart;
use crate::job::stop::Stop;
use crate::process::Exit;
use crate::warehouse::writable_dir;

/// The macro a teardown runs. It refuses any name that is not a PR isolation. With the
/// `database` strategy (one database per PR, as with DuckDB) it empties the target database,
/// refusing unless it is the one named (the agent links the PR's own database under that name);
/// with `schemas` (a server warehouse) it drops the schema named and every `<name>_<custom>`
/// schema of the target database, and nothing else.
const DROP_ISOLATION_MACRO: &str = include_str!("teardown.sql");

/// The project's first macro directory (`macro-paths`, default `macros`).
fn first_macro_path(project_file: &Path) -> String {
    std::fs::read_to_string(project_file)
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|project| {
            project
                .get("macro-paths")?
                .as_sequence()?
                .first()?
                .as_str()
                .map(str::to_owned)
        })
        .filter(|path| !path.starts_with('/') && !path.split('/').any(|part| part == ".."))
        .unwrap_or_else(|| "macros".to_owned())
}

/// A teardown's outcome: it succeeded, with `message`.
fn dropped(message: String, dbt_exit_code: Option<i32>) -> Outcome {
    Outcome {
        result: RunResult::Success,
        message: Some(message),
        dbt_exit_code,
        nodes: Vec::new(),
        deferred: Vec::new(),
        usage: None,
    }
}

impl AttemptRun<'_> {
    /// Drops `isolation`. `Job::check` already made sure it is this repository's and this PR's.
    pub async fn teardown(
        &mut self,
        project: &Path,
        isolation: &IsolationName,
    ) -> Result<Outcome, Stop> {
        let warehouse = self.services.warehouse.clone();
        if !warehouse.may_hold(&self.job.repository, isolation) {
            self.log.slimci(format_args!(
                "{isolation} does not exist on this runner; nothing to drop"
            ));
            return Ok(dropped(format!("{isolation}: nothing to drop"), None));
        }
        self.phase_started(Phase::Profile);
        let prepared = self.write_profile(project).and_then(|profile| {
            let macros = project.join(first_macro_path(&project.join("dbt_project.yml")));
            let file = macros.join("slimci_drop_isolation.sql");
            std::fs::create_dir_all(&macros)
                .and_then(|()| std::fs::write(&file, DROP_ISOLATION_MACRO))
                .map_err(|error| {
                    Stop::error(format!("cannot write the teardown macro: {error}"))
                })?;
            self.hand_over(&macros)?;
            self.hand_over(&file)?;
            Ok(profile.target)
        });
        self.phase_finished(Phase::Profile, prepared.is_ok());
        let target = prepared?;

        self.phase_started(Phase::Build);
        let args = vec![
            "run-operation".to_owned(),
            "slimci_drop_isolation".to_owned(),
            "--args".to_owned(),
            warehouse.teardown_args(isolation).to_string(),
            "--target".to_owned(),
            "ci".to_owned(),
            "--log-format".to_owned(),
            "json".to_owned(),
        ];
        self.log.slimci(format_args!("dbt {}", args.join(" ")));
        let ran = self
            .dbt(project, args, DbtStart::Cold)
            .await
            .map(|dbt| dbt.ran);
        let succeeded = matches!(&ran, Ok(ran) if ran.exit == Exit::Code(0));
        self.phase_finished(Phase::Build, succeeded);
        let ran = ran?;
        if ran.exit != Exit::Code(0) {
            return Err(Stop::for_dbt(
                &ran,
                "dbt run-operation slimci_drop_isolation",
                self.job.timeout,
            ));
        }
        if let Some(directory) = writable_dir(&target) {
            let _ = self.services.sandbox.take_back(directory);
        }
        warehouse
            .remove_isolation(&self.job.repository, isolation)
            .map_err(|error| {
                Stop::error(format!(
                    "dropped the relations but could not remove the database: {error}"
                ))
            })?;
        self.log.slimci(format_args!("dropped {isolation}"));
        Ok(dropped(format!("dropped {isolation}"), Some(0)))
    }
}
