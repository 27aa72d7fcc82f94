//! One dbt invocation of an attempt: its environment (`dbt_env`, the whole of it), started cold
//! in the sandbox or handed to the slot's pre-started dbt (`DbtStart`), its output streamed to
//! the log and its progress reported, its sandbox report passed on, and its timing
//! (`DbtTiming`) kept for the run's cache report.

use std::path::Path;
use std::time::{Duration, Instant};

use slimci_proto::EventBody;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dbtlog::Progress;
use crate::job::attempt_run::AttemptRun;
use crate::job::guard::{BuildChecks, GUARD_PREFIX, GuardLine};
use crate::job::log_sender::LOG_FLUSH_INTERVAL;
use crate::job::stop::{Stop, pids_limit_note};
use crate::process::{self, Deadline, Invocation, ProcessError, Ran};
use crate::warm::Warm;

/// How dbt is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbtStart {
    /// A new dbt process in the sandbox.
    Cold,
    /// The slot's pre-started dbt if there is one that takes the job, else cold.
    Prestarted,
}

/// When one dbt invocation was started, loaded, and done parsing.
#[derive(Debug, Clone, Copy)]
pub struct DbtTiming {
    pub spawned: Instant,
    /// dbt announced itself: Python and dbt are loaded.
    pub loaded: Option<Instant>,
    /// dbt reported what it found: the project is parsed.
    pub parsed: Option<Instant>,
}

/// A dbt invocation that ran: how it ended and its timing.
pub struct DbtRun {
    pub ran: Ran,
    pub timing: DbtTiming,
}

/// A running dbt: its output lines and its process.
struct DbtProcess {
    lines: mpsc::Receiver<String>,
    task: JoinHandle<Result<Ran, ProcessError>>,
    /// A pre-started dbt's task that passes the attempt's cancel and deadline on.
    linker: Option<JoinHandle<()>>,
    /// Whether it is a pre-started dbt, which says so before it confines itself.
    prestarted: bool,
}

/// The worker's line saying it applied the build's landlock rules (not part of the log).
const WORKER_CONFINED_PREFIX: &str = "[slimci-worker] {";

impl AttemptRun<'_> {
    /// dbt's whole environment: an allowlist, and the secrets the profile reads.
    pub fn dbt_env(&self) -> Vec<(String, String)> {
        let run = |name: &str| self.run_dir.join(name).display().to_string();
        let dbt_bin = self
            .services
            .config
            .dbt
            .parent()
            .map(|dir| format!("{}:", dir.display()))
            .unwrap_or_default();
        vec![
            (
                "PATH".into(),
                format!("{dbt_bin}/usr/local/bin:/usr/bin:/bin"),
            ),
            ("HOME".into(), run("home")),
            ("TMPDIR".into(), run("tmp")),
            ("LANG".into(), "C.UTF-8".into()),
            ("LC_ALL".into(), "C.UTF-8".into()),
            ("PYTHONUNBUFFERED".into(), "1".into()),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
            ("DBT_SEND_ANONYMOUS_USAGE_STATS".into(), "false".into()),
            ("DBT_USE_COLORS".into(), "false".into()),
            ("DBT_PROFILES_DIR".into(), run("profiles")),
            ("DBT_TARGET_PATH".into(), run("target")),
            ("DBT_LOG_PATH".into(), run("logs")),
        ]
        .into_iter()
        .chain(self.services.warehouse.dbt_env())
        .chain(self.profile_secrets.iter().cloned())
        .collect()
    }

    /// Runs dbt with `args` in the sandbox and streams its output; returns how it ended.
    pub async fn dbt(
        &mut self,
        project: &Path,
        args: Vec<String>,
        start: DbtStart,
    ) -> Result<DbtRun, Stop> {
        self.dbt_guarded(project, args, start, BuildChecks::default())
            .await
    }

    /// `dbt`, through the guard script when `checks` asks for any (`dbt build`): a build whose
    /// first connection failed exits `guard::NOT_CONNECTED_EXIT` and `self.connection_error`
    /// has the adapter's words; one the write guard refused exits `guard::REFUSED_EXIT` and
    /// `self.refusal` says why. The script's `connected` line ends an open profile step
    /// (`self.connecting`).
    pub async fn dbt_guarded(
        &mut self,
        project: &Path,
        args: Vec<String>,
        start: DbtStart,
        checks: BuildChecks<'_>,
    ) -> Result<DbtRun, Stop> {
        self.invocations += 1;
        let guard = match (checks.any(), &self.services.guard_script) {
            (true, Some(script)) => {
                // The script, and the worker's import of it, read the worker's directory.
                if let Some(directory) = script.script.parent() {
                    self.paths.read.push(directory.to_owned());
                }
                Some((checks.script_input(&args), script.clone()))
            }
            (true, None) => {
                self.log.slimci(
                    "write guard and connection check unavailable (dbt is not a Python script here); building without them",
                );
                self.connected();
                None
            }
            (false, _) => None,
        };
        let env = self.dbt_env();
        let spawned = Instant::now();
        let warm = match start {
            DbtStart::Prestarted => {
                let input = guard.as_ref().map(|(input, _)| input);
                self.hand_to_warm(project, &args, &env, input).await
            }
            DbtStart::Cold => None,
        };
        let mut dbt = match warm {
            Some(warm) => warm,
            None => match &guard {
                Some((input, script)) => {
                    let args = vec![script.script.display().to_string(), input.to_string()];
                    self.spawn_dbt(project, &script.python, args, env)?
                }
                None => {
                    let program = self.services.config.dbt.clone();
                    self.spawn_dbt(project, &program, args, env)?
                }
            },
        };
        let mut confined = false;
        let mut progress = Progress::default();
        let mut ticker = tokio::time::interval(LOG_FLUSH_INTERVAL);
        let mut progress_dirty = false;
        loop {
            tokio::select! {
                line = dbt.lines.recv() => match line {
                    Some(raw) if dbt.prestarted && !confined && raw.starts_with(WORKER_CONFINED_PREFIX) => {
                        confined = true;
                    }
                    Some(raw) if guard.is_some() && raw.starts_with(GUARD_PREFIX) => {
                        match checks.read_line(&raw[GUARD_PREFIX.len()..]) {
                            Some(GuardLine::Connected) => self.connected(),
                            Some(GuardLine::ConnectionError(error)) => {
                                self.connection_error = Some(error);
                            }
                            Some(GuardLine::Refused(refusal)) => {
                                self.log.slimci(&refusal);
                                self.refusal = Some(refusal);
                            }
                            None => self.log.line(raw),
                        }
                    }
                    Some(raw) => {
                        let parsed = progress.read(&raw);
                        progress_dirty |= parsed.progress_changed;
                        if let Some(text) = parsed.text {
                            self.log.line(text);
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    self.log.flush();
                    if progress_dirty {
                        self.reporter.send(EventBody::Progress { done: progress.done, total: progress.total });
                        progress_dirty = false;
                    }
                }
            }
        }
        self.log.flush();
        let timing = DbtTiming {
            spawned,
            loaded: progress.started,
            parsed: progress.parsed,
        };
        if progress_dirty {
            self.reporter.send(EventBody::Progress {
                done: progress.done,
                total: progress.total,
            });
        }
        let mut ran = dbt
            .task
            .await
            .map_err(|error| Stop::error(format!("build task failed: {error}")))?
            .map_err(|error| Stop::error(error.to_string()))?;
        if let Some(linker) = dbt.linker {
            linker.abort();
        }
        if let Some(report) = &mut ran.report {
            report.prestarted = confined;
        }
        if let Some(report) = &ran.report
            && self.last_report.as_ref() != Some(report)
        {
            if self.last_report.is_none() {
                for warning in &report.warnings {
                    self.log.slimci(format_args!("sandbox: {warning}"));
                }
            }
            self.reporter.send(EventBody::Sandbox(report.clone()));
            self.last_report = Some(report.clone());
        }
        if let Some(error) = &ran.sandbox_error {
            return Err(Stop::error(format!(
                "the sandbox did not start dbt: {error}"
            )));
        }
        self.oom_kills += ran.oom_kills;
        self.pids_limit_hits += ran.pids_limit_hits;
        if ran.pids_limit_hits > 0 {
            self.log.slimci(pids_limit_note(&ran));
        }
        Ok(DbtRun { ran, timing })
    }

    /// Hands the build to a pre-started dbt, with a task that passes the attempt's cancel and
    /// deadline on. None if there is none or it cannot take the job.
    async fn hand_to_warm(
        &mut self,
        project: &Path,
        args: &[String],
        env: &[(String, String)],
        guard: Option<&serde_json::Value>,
    ) -> Option<DbtProcess> {
        let warm = self.services.warm.as_ref()?.take()?;
        let job = serde_json::json!({
            "args": args,
            "cwd": project,
            "env": env,
            "landlock": self.services.sandbox.landlock_rules(&self.paths),
            "guard": guard,
        });
        if let Err(error) = warm.hand(&job).await {
            self.log.slimci(format_args!("starting dbt cold: {error}"));
            warm.discard();
            return None;
        }
        let Warm {
            lines,
            task,
            stop,
            timeout,
            ..
        } = warm;
        let (cancel, deadline) = (self.cancel.clone(), self.deadline);
        let linker = tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => stop.cancel(),
                () = tokio::time::sleep_until(deadline) => timeout.cancel(),
            }
        });
        Some(DbtProcess {
            lines,
            task,
            linker: Some(linker),
            prestarted: true,
        })
    }

    /// Starts `program` (dbt, or dbt's Python with the guard script) cold in the sandbox.
    fn spawn_dbt(
        &self,
        project: &Path,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<DbtProcess, Stop> {
        let program = program.to_owned();
        let name = format!(
            "{}-{}-{}",
            self.job.run_id, self.job.attempt, self.invocations
        );
        let prepared = self
            .services
            .sandbox
            .prepare(&name, &program, &args, project, &env, &self.paths)
            .map_err(|error| Stop::error(error.to_string()))?;
        let invocation = Invocation {
            program,
            args,
            cwd: project.to_owned(),
            env,
            deadline: Deadline::At(self.deadline),
            grace: Duration::from_secs(self.services.config.grace_secs()),
            sandbox: Some(prepared),
        };
        let (lines, incoming) = mpsc::channel(4096);
        let cancel = self.cancel.clone();
        let task = tokio::spawn(async move { process::run(invocation, lines, &cancel).await });
        Ok(DbtProcess {
            lines: incoming,
            task,
            linker: None,
            prestarted: false,
        })
    }
}
