//! One attempt of one run, from checkout to the final report: `execute` and the per-attempt
//! driver (`AttemptRun::run`).
//!
//! Phases: checkout (git cache → fresh directory), state fetch (CI only), deps (only when the
//! project has packages), profile, build, upload, and for a deploy that built, the seed parse
//! (production's code parsed for CI builds); then a successful deploy is made live, any other
//! deploy copy discarded. A teardown drops its isolation after deps instead. On PostgreSQL and
//! Snowflake the profile step lasts until the build's dbt has opened its first connection, so a
//! wrong key, role or host fails the run at the profile step. Each phase
//! is reported with its timing; the first that fails ends the attempt with a `Stop` saying
//! which and why.

mod attempt_run;
mod build;
mod checkout;
mod dbt;
mod deps;
pub mod guard;
mod log_sender;
mod parse_cache;
mod profile;
mod results;
mod seed;
mod services;
mod state_fetch;
mod stop;
mod teardown;
mod upload;

use slimci_proto::{AttemptUsage, CheckedJob, JobKind, Outcome, Phase, RunResult};
use tokio_util::sync::CancellationToken;

use crate::events::Reporter;
use crate::job::attempt_run::AttemptRun;
use crate::job::build::Built;
use crate::job::guard::{BuildChecks, WriteGuard};
use crate::job::stop::Stop;
use crate::trace::AttemptTrace;
use crate::warehouse::{Target, writable_dir};

pub use crate::job::profile::{ProfileError, profile_name};
pub use crate::job::results::{
    RunResultsError, build_message, dbt_error, failure_summary, read_deferred, read_run_results,
};
pub use crate::job::services::Services;

/// Runs the job and returns how it ended. Never panics on bad input; every failure becomes an
/// outcome with a message.
pub async fn execute(
    services: &Services,
    job: &CheckedJob,
    reporter: &Reporter,
    cancel: &CancellationToken,
    trace: Option<&AttemptTrace>,
) -> Outcome {
    let mut attempt = AttemptRun::new(services, job, reporter, cancel, trace);
    let mut outcome = match attempt.run().await {
        Ok(outcome) => outcome,
        Err(stop) => {
            attempt.log.slimci(&stop.message);
            Outcome {
                result: stop.result,
                message: Some(stop.message),
                dbt_exit_code: None,
                nodes: Vec::new(),
                deferred: Vec::new(),
                usage: None,
            }
        }
    };
    attempt.log.finish();
    outcome.usage = Some(AttemptUsage {
        // The consumer, which holds the slot, fills in how long.
        slot_busy_s: 0.0,
        oom_kills: attempt.oom_kills,
        pids_limit_hits: attempt.pids_limit_hits,
    });
    // Messages are stored and shown like the log: no secret in them either.
    let redactor = attempt.log.redactor();
    outcome.message = outcome.message.map(|message| redactor.redact(&message));
    for node in &mut outcome.nodes {
        node.message = node
            .message
            .as_deref()
            .map(|message| redactor.redact(message));
    }
    if let Err(error) = std::fs::remove_dir_all(&attempt.run_dir)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, dir = %attempt.run_dir.display(), "could not remove the run directory");
    }
    attempt.holds.clear();
    if let Some(pool) = &services.warm {
        let (pool, sandbox) = (pool.clone(), services.sandbox.clone());
        tokio::spawn(async move { pool.replenish(&sandbox).await });
    }
    let cache = services.cache.clone();
    tokio::task::spawn_blocking(move || {
        let evicted = cache.evict();
        if !evicted.removed.is_empty() || evicted.busy > 0 {
            tracing::info!(
                removed = ?evicted.removed,
                freed_bytes = evicted.removed_bytes,
                busy = evicted.busy,
                total_bytes = evicted.total_bytes,
                "cache: evicted least recently used entries"
            );
        }
    });
    outcome
}

impl AttemptRun<'_> {
    /// The phases in order.
    async fn run(&mut self) -> Result<Outcome, Stop> {
        let job = self.job;
        if let Some(trace) = self.trace {
            self.log.slimci(format_args!(
                "attempt {} on {}, trace {}",
                job.attempt, self.services.config.name, trace.trace_id
            ));
        }
        for directory in ["home", "tmp", "profiles", "target", "logs"] {
            let path = self.run_dir.join(directory);
            std::fs::create_dir_all(&path).map_err(|error| {
                Stop::error(format!("cannot create {}: {error}", path.display()))
            })?;
        }

        // Checkout.
        self.phase_started(Phase::Checkout);
        let checkout_result = self.checkout().await;
        self.phase_finished(Phase::Checkout, checkout_result.is_ok());
        let project = checkout_result?;
        self.hand_over(&self.run_dir.clone())?;
        self.paths.write.push(self.run_dir.clone());
        self.check_cancelled()?;

        // Production state (CI only).
        let state_dir = match &job.kind {
            JobKind::Deploy | JobKind::Teardown { .. } => None,
            JobKind::Ci {
                production_state, ..
            } => {
                self.phase_started(Phase::StateFetch);
                let fetched = self.fetch_state(production_state).await;
                self.phase_finished(Phase::StateFetch, fetched.is_ok());
                let fetched = fetched?;
                self.paths.read.push(fetched.clone());
                Some(fetched)
            }
        };
        self.check_cancelled()?;

        // Packages, when the project has any.
        if deps::has_packages(&project) {
            self.phase_started(Phase::Deps);
            let deps = self.deps(&project).await;
            self.phase_finished(Phase::Deps, deps.is_ok());
            deps?;
            self.check_cancelled()?;
        }

        if let JobKind::Teardown { isolation, .. } = &job.kind {
            return self.teardown(&project, isolation).await;
        }

        // Profile: written, and on a server warehouse proven by the build's first connection,
        // which ends the step from inside the build's dbt (`AttemptRun::connected`).
        self.phase_started(Phase::Profile);
        let profile = self.write_profile(&project);
        let connect = profile.is_ok() && self.services.warehouse.is_server();
        if !connect {
            self.phase_finished(Phase::Profile, profile.is_ok());
        }
        let profile = profile?;
        let target = profile.target;

        // Build.
        if connect {
            self.connecting = true;
        } else {
            self.phase_started(Phase::Build);
        }
        let guard = WriteGuard::for_target(&self.services.warehouse, &target);
        let checks = BuildChecks {
            guard: guard.as_ref(),
            connect,
        };
        let built = self
            .build(&project, state_dir.as_deref(), &profile.text, checks)
            .await;
        if self.connecting {
            self.connecting = false;
            self.phase_finished(Phase::Profile, false);
        } else {
            self.phase_finished(
                Phase::Build,
                built
                    .as_ref()
                    .is_ok_and(|built| built.result == RunResult::Success),
            );
        }
        let built = match built {
            Ok(built) => built,
            Err(stop) => {
                self.discard(&target);
                return Err(stop);
            }
        };

        // Upload, then make a successful deploy live.
        self.phase_started(Phase::Upload);
        let uploaded = self.upload().await;
        self.phase_finished(Phase::Upload, uploaded.is_ok());
        let nodes =
            read_run_results(&self.target_dir().join("run_results.json")).unwrap_or_else(|error| {
                self.log.slimci(format_args!("no node results: {error}"));
                Vec::new()
            });
        if let (Some(trace), Some(build)) = (self.trace, self.build_span) {
            trace.nodes(build, &nodes);
        }
        let deferred = match &job.kind {
            JobKind::Ci { .. } => read_deferred(&self.target_dir().join("manifest.json"), &nodes),
            JobKind::Deploy | JobKind::Teardown { .. } => Vec::new(),
        };
        if target.is_deploy()
            && built.result == RunResult::Success
            && uploaded.is_ok()
            && self.services.config.cache.partial_parse
            && self.services.warehouse.ci_parse_carries_over()
        {
            self.phase_started(Phase::SeedParse);
            let seeded = self.seed_parse(&project, &target).await;
            self.phase_finished(Phase::SeedParse, matches!(seeded, Ok(true)));
            if let Err(stop) = seeded {
                self.discard(&target);
                return Err(stop);
            }
        }
        self.publish_or_discard(&target, built, uploaded)?;
        let dbt_error = (built.result == RunResult::Error)
            .then(|| dbt_error(&self.run_dir.join("logs").join("dbt.log")))
            .flatten()
            .map(
                |error| match self.services.warehouse.connection_hint(&error) {
                    Some(hint) => format!("{error}; {hint}"),
                    None => error,
                },
            );
        Ok(Outcome {
            result: built.result,
            message: build_message(
                built,
                &nodes,
                self.limit_note.as_deref(),
                dbt_error.as_deref(),
            ),
            dbt_exit_code: Some(built.dbt_exit_code),
            nodes,
            deferred,
            usage: None,
        })
    }

    /// After the upload: a deploy that succeeded, wrote its manifest and uploaded it becomes
    /// production; every other deploy copy is removed.
    fn publish_or_discard(
        &mut self,
        target: &Target,
        built: Built,
        uploaded: Result<(), Stop>,
    ) -> Result<(), Stop> {
        let has_manifest = self.target_dir().join("manifest.json").is_file();
        match (target.is_deploy(), built.result, uploaded) {
            (true, RunResult::Success, Ok(())) if !has_manifest => {
                self.discard(target);
                Err(Stop::error(
                    "dbt succeeded but wrote no manifest.json, so production state was not updated",
                ))
            }
            (true, RunResult::Success, Ok(())) => {
                // Production is read by later builds, written by none.
                if let Some(directory) = writable_dir(target) {
                    self.services
                        .sandbox
                        .take_back(directory)
                        .map_err(|error| {
                            self.discard(target);
                            Stop::error(format!("the build succeeded but {error}"))
                        })?;
                }
                self.services
                    .warehouse
                    .publish_deploy(&self.job.repository, self.job.run_id)
                    .map_err(|error| {
                        Stop::error(format!(
                            "the build succeeded but could not be made live: {error}"
                        ))
                    })?;
                if matches!(target, Target::DuckDb(_)) {
                    self.log.slimci("production database swapped in");
                }
                Ok(())
            }
            (_, _, Err(stop)) => {
                self.discard(target);
                Err(stop)
            }
            _ => {
                self.discard(target);
                Ok(())
            }
        }
    }
}
