//! `AttemptRun`: the state of one attempt while it runs (its job, run directory, deadline,
//! log, the paths and secrets its builds get, the caches it used and holds), with the small
//! steps every phase shares: reporting a phase, checking for cancel and timeout, handing a path
//! to the build user, discarding a deploy's copy.

use std::path::{Path, PathBuf};

use slimci_proto::{CacheReport, CheckedJob, EventBody, Phase, SandboxReport};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::Held;
use crate::events::Reporter;
use crate::job::log_sender::LogSender;
use crate::job::services::Services;
use crate::job::stop::Stop;
use crate::redact::Redactor;
use crate::sandbox::BuildPaths;
use crate::trace::AttemptTrace;
use crate::warehouse::Target;

/// One attempt of one run, while it runs.
pub struct AttemptRun<'a> {
    pub services: &'a Services,
    pub job: &'a CheckedJob,
    pub reporter: &'a Reporter,
    pub cancel: &'a CancellationToken,
    pub log: LogSender<'a>,
    pub run_dir: PathBuf,
    pub deadline: Instant,
    /// Paths the build may use besides the run directory.
    pub paths: BuildPaths,
    /// `DBT_ENV_SECRET_*` variables the profile reads, with their values.
    pub profile_secrets: Vec<(String, String)>,
    /// dbt invocations so far (each gets its own sandbox name).
    pub invocations: u32,
    /// The sandbox the last dbt invocation ran in, as reported.
    pub last_report: Option<SandboxReport>,
    /// A limit the build hit without being stopped by it, for the run's message.
    pub limit_note: Option<String>,
    /// Why the write guard refused the build, when it did.
    pub refusal: Option<String>,
    /// Whether the profile step is still open, waiting for the build's first connection.
    pub connecting: bool,
    /// The adapter's words when the build's first connection failed.
    pub connection_error: Option<String>,
    /// Which caches the attempt used, reported once the build has run.
    pub caches: CacheReport,
    /// Cache entries this attempt reads; eviction leaves them alone until it ends.
    pub holds: Vec<Held>,
    /// Processes of its dbt invocations the kernel killed for the memory limit, and forks
    /// their pids limit refused, over all of them.
    pub oom_kills: u64,
    pub pids_limit_hits: u64,
    /// When each phase started, by the monotonic and the wall clock.
    phases_started: std::sync::Mutex<Vec<(Phase, Instant, std::time::SystemTime)>>,
    /// The attempt's place in its run's trace, when traces are exported.
    pub trace: Option<&'a AttemptTrace>,
    /// The build phase's span, parent of the nodes' spans.
    pub build_span: Option<slimci_telemetry::TraceParent>,
}

impl<'a> AttemptRun<'a> {
    pub fn new(
        services: &'a Services,
        job: &'a CheckedJob,
        reporter: &'a Reporter,
        cancel: &'a CancellationToken,
        trace: Option<&'a AttemptTrace>,
    ) -> AttemptRun<'a> {
        let run_dir = services
            .config
            .work_dir
            .join("runs")
            .join(format!("{}-{}", job.run_id, job.attempt));
        AttemptRun {
            services,
            job,
            reporter,
            cancel,
            log: LogSender::new(reporter, Redactor::new(services.secrets.redacted_values())),
            run_dir,
            deadline: Instant::now() + job.timeout,
            paths: BuildPaths::default(),
            profile_secrets: Vec::new(),
            invocations: 0,
            last_report: None,
            limit_note: None,
            refusal: None,
            connecting: false,
            connection_error: None,
            caches: CacheReport::default(),
            holds: Vec::new(),
            oom_kills: 0,
            pids_limit_hits: 0,
            phases_started: std::sync::Mutex::new(Vec::new()),
            trace,
            build_span: None,
        }
    }

    /// The run directory's `target/` (dbt's `DBT_TARGET_PATH`).
    pub fn target_dir(&self) -> PathBuf {
        self.run_dir.join("target")
    }

    pub fn phase_started(&self, phase: Phase) {
        self.phases_started.lock().expect("phase clock lock").push((
            phase,
            Instant::now(),
            std::time::SystemTime::now(),
        ));
        self.reporter.send(EventBody::PhaseStarted { phase });
    }

    pub fn phase_finished(&mut self, phase: Phase, ok: bool) {
        self.log.flush();
        let started = self
            .phases_started
            .lock()
            .expect("phase clock lock")
            .iter()
            .rev()
            .find(|(started, ..)| *started == phase)
            .map(|&(_, at, wall)| (at, wall));
        let duration_s = started.map(|(at, _)| at.elapsed().as_secs_f64());
        if let (Some(trace), Some((_, wall))) = (self.trace, started) {
            let span = trace.phase(phase, wall, ok);
            if phase == Phase::Build {
                self.build_span = Some(span);
            }
        }
        self.reporter.send(EventBody::PhaseFinished {
            phase,
            ok,
            duration_s,
        });
    }

    /// The build's first connection worked (or is not checked): the profile step ends and the
    /// build step starts.
    pub fn connected(&mut self) {
        if self.connecting {
            self.connecting = false;
            self.phase_finished(Phase::Profile, true);
            self.phase_started(Phase::Build);
        }
    }

    /// Stops the attempt between steps if it was cancelled or ran out of time.
    pub fn check_cancelled(&self) -> Result<(), Stop> {
        if self.cancel.is_cancelled() {
            return Err(Stop::cancelled());
        }
        if Instant::now() >= self.deadline {
            return Err(Stop::timed_out(self.job.timeout));
        }
        Ok(())
    }

    /// Gives `path` to the build user.
    pub fn hand_over(&self, path: &Path) -> Result<(), Stop> {
        self.services
            .sandbox
            .hand_over(path)
            .map_err(|error| Stop::error(error.to_string()))
    }

    /// Removes a deploy's copy of production (a PR's database stays for its next build).
    pub fn discard(&self, target: &Target) {
        if target.is_deploy() {
            self.services
                .warehouse
                .discard_deploy(&self.job.repository, self.job.run_id);
        }
    }
}
