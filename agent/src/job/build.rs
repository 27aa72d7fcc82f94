//! The build phase: `dbt build` (CI: `state:modified+` deferred to production, into the PR's
//! isolation; deploy: everything, into production's copy) on the slot's pre-started dbt when
//! there is one, with the parse cache around it. Its result is dbt's exit code; a build that
//! did not exit by itself (timeout, cancel, a kill) stops the attempt.

use std::path::Path;

use crate::job::attempt_run::AttemptRun;
use crate::job::dbt::DbtStart;
use crate::job::guard::{BuildChecks, NOT_CONNECTED_EXIT, REFUSED_EXIT};
use crate::job::parse_cache::ParseFor;
use crate::job::stop::{Stop, pids_limit_note};
use crate::process::Exit;
use slimci_proto::RunResult;

/// A `dbt build` that exited by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    pub result: RunResult,
    pub dbt_exit_code: i32,
}

impl AttemptRun<'_> {
    /// Builds the project; `state_dir` is production's manifest for a CI build, none for a
    /// deploy. `profile` is the profile written for the attempt; `checks`, what a CI build may
    /// write and whether the first connection is checked before parsing.
    pub async fn build(
        &mut self,
        project: &Path,
        state_dir: Option<&Path>,
        profile: &str,
        checks: BuildChecks<'_>,
    ) -> Result<Built, Stop> {
        let mut args: Vec<String> = vec!["build".into()];
        match state_dir {
            Some(state) => {
                args.extend(
                    ["--select", "state:modified+", "--defer", "--state"].map(String::from),
                );
                args.push(state.display().to_string());
                args.extend(["--target".into(), "ci".into()]);
            }
            None => args.extend(["--target".into(), "prod".into()]),
        }
        args.extend(["--log-format".into(), "json".into()]);
        let target = if state_dir.is_some() { "ci" } else { "prod" };
        let parse = self
            .restore_parse(project, ParseFor { target, profile })
            .await;
        self.log.slimci(format_args!("dbt {}", args.join(" ")));
        let dbt = self
            .dbt_guarded(project, args, DbtStart::Prestarted, checks)
            .await?;
        let ran = &dbt.ran;
        if ran.exit == Exit::Code(NOT_CONNECTED_EXIT)
            && let Some(error) = self.connection_error.take()
        {
            let warehouse = &self.services.warehouse;
            let mut message = format!("cannot connect to {}: {error}", warehouse.display_name());
            if let Some(settings) = warehouse.connection_settings() {
                message = format!("{message}; {settings}");
            }
            return Err(Stop::error(message));
        }
        self.after_parse(parse, &dbt).await;
        let ran = dbt.ran;
        if ran.exit == Exit::Code(REFUSED_EXIT)
            && let Some(refusal) = self.refusal.take()
        {
            return Err(Stop::error(refusal));
        }
        match ran.exit {
            Exit::Code(0) => Ok(Built {
                result: RunResult::Success,
                dbt_exit_code: 0,
            }),
            Exit::Code(code) if ran.oom_kills == 0 => {
                if ran.pids_limit_hits > 0 {
                    self.limit_note = Some(pids_limit_note(&ran));
                }
                Ok(Built {
                    result: RunResult::from_dbt_exit_code(code),
                    dbt_exit_code: code,
                })
            }
            _ => Err(Stop::for_dbt(&ran, "dbt build", self.job.timeout)),
        }
    }
}
