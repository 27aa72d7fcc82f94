//! Processes a test starts: each in its own process group, logging to its own file, killed
//! with the test. They are spawned from one long-lived thread with a parent-death signal
//! (`setpriv --pdeathsig`), so even a test process killed by nextest's timeout takes them
//! along; and every process that is not meant to exit is watched, so a wait fails at once when
//! one died instead of running into its deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::measure::process_gone;

/// A process started by the harness, in its own process group.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    pub fn start(
        name: &str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
    ) -> anyhow::Result<Process> {
        Process::start_with_env(name, program, args, log, &[])
    }

    pub fn start_with_env(
        name: &str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        env: &[(String, String)],
    ) -> anyhow::Result<Process> {
        let file = std::fs::File::create(&log)?;
        let mut command = command_dying_with_test(program);
        command
            .args(args)
            .envs(env.iter().map(|(key, value)| (key, value)))
            .env("RUST_LOG", "info,lapin=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = spawn(command).with_context(|| format!("starting {}", program.display()))?;
        watch(child.id() as i32, name, &log);
        Ok(Process {
            name: name.to_owned(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the process to exit (after a signal).
    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }

    /// Fails if the process has exited: nothing here is meant to exit on its own.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited unexpectedly ({status}); log:\n{}",
                self.name,
                tail(&self.log)
            );
        }
    }

    /// Sends `signal` to the process group. The process may exit now: it is no longer watched.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        unwatch(self.pid());
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// Sends `signal` to the process alone (not its group), as when its machine vanishes.
    pub fn signal_process(&self, signal: nix::sys::signal::Signal) {
        unwatch(self.pid());
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL the whole group.
    pub fn stop(&mut self, grace: Duration) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A command for `program` that runs in a process group of its own and gets SIGKILL when the
/// test process dies (through `setpriv`, from util-linux, where it exists).
pub fn command_dying_with_test(program: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    const SETPRIV: &str = "/usr/bin/setpriv";
    let mut command = if Path::new(SETPRIV).is_file() {
        let mut command = Command::new(SETPRIV);
        command.args(["--pdeathsig", "KILL", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    };
    command.process_group(0);
    command
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` from the harness's spawner thread. A parent-death signal fires when the
/// *thread* that forked the child ends, so children are forked from one thread that lives as
/// long as the test process, never from a runtime's short-lived blocking threads.
pub fn spawn(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("slimci-test-spawner".into())
            .spawn(move || {
                for (mut command, answer) in incoming {
                    let _ = answer.send(command.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(requests)
    });
    let (answer, answered) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .send((command, answer))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answered
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

struct Watched {
    pid: i32,
    name: String,
    log: PathBuf,
}

static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());

fn watched() -> std::sync::MutexGuard<'static, Vec<Watched>> {
    WATCHED.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn watch(pid: i32, name: &str, log: &Path) {
    watched().push(Watched {
        pid,
        name: name.to_owned(),
        log: log.to_owned(),
    });
}

fn unwatch(pid: i32) {
    watched().retain(|process| process.pid != pid);
}

/// Fails, naming the process, its exit and its last log line, when a watched process (one
/// nothing asked to stop) has exited. Every `wait_for` calls it on every round.
pub fn check_watched() -> anyhow::Result<()> {
    let dead = watched()
        .iter()
        .find(|process| process_gone(process.pid))
        .map(|process| (process.name.clone(), process.pid, process.log.clone()));
    let Some((name, pid, log)) = dead else {
        return Ok(());
    };
    unwatch(pid);
    bail!(
        "{name} (pid {pid}) exited on its own; its last log line: {}\n(log {}):\n{}",
        last_line(&log),
        log.display(),
        tail(&log)
    )
}

/// The last 60 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The last non-empty line of a log file.
pub fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("(the log is empty)")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_process_that_exits_is_named_with_its_last_log_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut process = Process::start(
            "quitter",
            Path::new("/bin/sh"),
            &["-c", "echo starting; echo 'fatal: no config' ; exit 3"],
            dir.path().join("quitter.log"),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let error = loop {
            if let Err(error) = check_watched() {
                break error.to_string();
            }
            assert!(Instant::now() < deadline, "the exit was never noticed");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(error.contains("quitter"), "{error}");
        assert!(error.contains("fatal: no config"), "{error}");
        assert!(process.exited());
    }

    #[test]
    fn a_signalled_process_is_no_longer_watched() {
        let dir = tempfile::tempdir().unwrap();
        let process = Process::start(
            "sleeper",
            Path::new("/bin/sleep"),
            &["30"],
            dir.path().join("sleeper.log"),
        )
        .unwrap();
        let pid = process.pid();
        process.signal(nix::sys::signal::Signal::SIGKILL);
        assert!(watched().iter().all(|watched| watched.pid != pid));
    }
}
