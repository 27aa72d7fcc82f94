//! Pre-started dbt, one per slot: loading Python and dbt costs about 2 s of every invocation,
//! so the agent pays it while the slot waits for its next job.
//!
//! A warm dbt is an ordinary sandboxed invocation (wrapper, init, cgroup, PID namespace, build
//! user) of `slimci_worker.py` under dbt's own Python, started with landlock rules that cover any
//! build of this agent (every run directory, the warehouse, the cached manifests). It loads dbt
//! and waits on a FIFO. The build hands it its arguments, working directory, environment and its
//! own landlock rules; the worker confines itself to those before it reads anything of the
//! project, then runs dbt's command line in-process. From then on it is the build's process
//! tree like any other: output, cancel, timeout, cgroup kill and report go through
//! `process::run`. Each warm dbt serves one build; the slot's next one is started after it.
//!
//! Only `dbt build` goes this way; `deps` and `run-operation` start dbt as usual. A warm dbt
//! that died (a broken virtualenv) is dropped and the build starts dbt cold.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::process::{self, Deadline, Invocation, ProcessError, Ran};
use crate::sandbox::{BuildPaths, Sandbox, SandboxError};

const WORKER: &str = include_str!("slimci_worker.py");

/// How long a build waits for its warm dbt to open the FIFO (it does so first thing).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pre-started dbt could not be started or given its build (the build then starts dbt
/// cold).
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("mkfifo {path}: {source}")]
    MakeFifo {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("{path}: {source}")]
    FifoPermissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("opening {path}: {source}")]
    OpenFifo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pre-started dbt ended before its job")]
    EndedBeforeJob,
    #[error("the pre-started dbt did not open its job FIFO")]
    FifoNotOpened,
    #[error("{0}")]
    HandOverTask(#[from] tokio::task::JoinError),
    #[error("writing the job: {0}")]
    WriteJob(#[source] std::io::Error),
}

/// A dbt loaded ahead of its job.
pub struct Warm {
    pub fifo: PathBuf,
    pub lines: mpsc::Receiver<String>,
    pub task: JoinHandle<Result<Ran, ProcessError>>,
    /// Cancels it (as `Exit::Cancelled`).
    pub stop: CancellationToken,
    /// Ends it as `Exit::TimedOut`.
    pub timeout: CancellationToken,
}

impl Warm {
    /// Stops it and removes its FIFO (it died, or was not used).
    pub fn discard(self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.fifo);
    }
}

pub struct WarmPool {
    python: PathBuf,
    script: PathBuf,
    runs: PathBuf,
    /// What a warm dbt may touch before it knows its build.
    paths: BuildPaths,
    grace: Duration,
    slots: usize,
    idle: Mutex<Vec<Warm>>,
    closed: Mutex<bool>,
}

/// The interpreter of a Python console script (its `#!` line), if it is one.
pub fn script_python(dbt: &Path) -> Option<PathBuf> {
    let text = std::fs::read(dbt).ok()?;
    let first = text.split(|byte| *byte == b'\n').next()?;
    let line = std::str::from_utf8(first).ok()?.strip_prefix("#!")?.trim();
    let interpreter = PathBuf::from(line.split_whitespace().next()?);
    let name = interpreter.file_name()?.to_string_lossy().into_owned();
    (interpreter.is_absolute() && name.starts_with("python")).then_some(interpreter)
}

impl WarmPool {
    /// A pool for `slots` builds, or none when dbt is not a Python script here.
    pub fn new(
        dbt: &Path,
        work_dir: &Path,
        paths: BuildPaths,
        grace: Duration,
        slots: usize,
    ) -> std::io::Result<Option<WarmPool>> {
        let Some(python) = script_python(dbt) else {
            return Ok(None);
        };
        use std::os::unix::fs::PermissionsExt;
        let directory = work_dir.join("dbt-worker");
        std::fs::create_dir_all(&directory)?;
        std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o755))?;
        let script = directory.join("slimci_worker.py");
        std::fs::write(&script, WORKER)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))?;
        let mut paths = paths;
        paths.read.push(directory);
        Ok(Some(WarmPool {
            python,
            script,
            runs: work_dir.join("runs"),
            paths,
            grace,
            slots,
            idle: Mutex::new(Vec::new()),
            closed: Mutex::new(false),
        }))
    }

    /// A warm dbt for a build, if one is ready or loading.
    pub fn take(&self) -> Option<Warm> {
        let mut idle = self.idle.lock().expect("warm pool lock");
        while let Some(warm) = idle.pop() {
            if !warm.task.is_finished() {
                return Some(warm);
            }
            tracing::warn!("a pre-started dbt ended on its own; starting another");
            warm.discard();
        }
        None
    }

    /// Starts warm dbts until there is one per slot.
    pub async fn replenish(&self, sandbox: &Sandbox) {
        loop {
            {
                let mut idle = self.idle.lock().expect("warm pool lock");
                let (alive, dead): (Vec<Warm>, Vec<Warm>) =
                    idle.drain(..).partition(|warm| !warm.task.is_finished());
                *idle = alive;
                dead.into_iter().for_each(Warm::discard);
                if idle.len() >= self.slots || *self.closed.lock().expect("warm pool lock") {
                    return;
                }
            }
            match self.start(sandbox).await {
                Ok(warm) => self.idle.lock().expect("warm pool lock").push(warm),
                Err(error) => {
                    tracing::warn!(%error, "cannot pre-start dbt; builds start it cold");
                    return;
                }
            }
        }
    }

    /// Stops every idle warm dbt and takes no more (the agent is stopping).
    pub async fn close(&self) {
        *self.closed.lock().expect("warm pool lock") = true;
        let idle: Vec<Warm> = std::mem::take(&mut *self.idle.lock().expect("warm pool lock"));
        for warm in idle {
            warm.stop.cancel();
            let _ = std::fs::remove_file(&warm.fifo);
            let _ = tokio::time::timeout(Duration::from_secs(15), warm.task).await;
        }
    }

    async fn start(&self, sandbox: &Sandbox) -> Result<Warm, WarmError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let fifo = self.runs.join(format!(".warm-{id}.fifo"));
        // The agent's: the build user may read it (the worker does), but no build can write a
        // job into another slot's worker.
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).map_err(
            |source| WarmError::MakeFifo {
                path: fifo.clone(),
                source,
            },
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o644)).map_err(
                |source| WarmError::FifoPermissions {
                    path: fifo.clone(),
                    source,
                },
            )?;
        }
        let args = vec![
            "-u".to_owned(),
            self.script.display().to_string(),
            fifo.display().to_string(),
        ];
        let env: Vec<(String, String)> = [
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("HOME", "/nonexistent"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C.UTF-8"),
            ("PYTHONUNBUFFERED", "1"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("DBT_SEND_ANONYMOUS_USAGE_STATS", "false"),
        ]
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
        let cwd = self.script.parent().unwrap_or(Path::new("/")).to_owned();
        let prepared = sandbox
            .prepare(
                &format!("warm-{id}"),
                &self.python,
                &args,
                &cwd,
                &env,
                &self.paths,
            )
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&fifo);
            })?;
        let stop = CancellationToken::new();
        let timeout = CancellationToken::new();
        let invocation = Invocation {
            program: self.python.clone(),
            args,
            cwd,
            env,
            // The build's own deadline arrives with it, through `timeout`.
            deadline: Deadline::Later(timeout.clone()),
            grace: self.grace,
            sandbox: Some(prepared),
        };
        let (sender, lines) = mpsc::channel(4096);
        let cancel = stop.clone();
        let task = tokio::spawn(async move { process::run(invocation, sender, &cancel).await });
        Ok(Warm {
            fifo,
            lines,
            task,
            stop,
            timeout,
        })
    }
}

impl Warm {
    /// Gives the warm dbt its build: `job` is the worker's JSON document.
    pub async fn hand(&self, job: &serde_json::Value) -> Result<(), WarmError> {
        let fifo = self.fifo.clone();
        let bytes = job.to_string().into_bytes();
        let deadline = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        loop {
            // Non-blocking: fails with ENXIO until the worker has the FIFO open for reading.
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&fifo);
            match opened {
                Ok(file) => {
                    let written = tokio::task::spawn_blocking(move || {
                        use std::io::Write;
                        let mut file = file;
                        // Blocking writes from here: a job is far below the pipe's buffer.
                        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
                            .map(nix::fcntl::OFlag::from_bits_truncate)
                            .unwrap_or(nix::fcntl::OFlag::empty());
                        let _ = nix::fcntl::fcntl(
                            &file,
                            nix::fcntl::FcntlArg::F_SETFL(flags - nix::fcntl::OFlag::O_NONBLOCK),
                        );
                        file.write_all(&bytes)
                    })
                    .await?;
                    let _ = std::fs::remove_file(&fifo);
                    return written.map_err(WarmError::WriteJob);
                }
                Err(error) if error.raw_os_error() == Some(nix::libc::ENXIO) => {
                    if self.task.is_finished() {
                        return Err(WarmError::EndedBeforeJob);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(WarmError::FifoNotOpened);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(source) => return Err(WarmError::OpenFifo { path: fifo, source }),
            }
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_comes_from_the_console_script() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("dbt");
        std::fs::write(
            &script,
            "#!/opt/venv/bin/python3\nimport sys\nfrom dbt.cli.main import cli\n",
        )
        .unwrap();
        assert_eq!(
            script_python(&script),
            Some(PathBuf::from("/opt/venv/bin/python3"))
        );
        std::fs::write(&script, "\x7fELF binary").unwrap();
        assert_eq!(script_python(&script), None);
        std::fs::write(&script, "#!/bin/sh\nexec dbt \"$@\"\n").unwrap();
        assert_eq!(script_python(&script), None);
    }
}
