//! Runs one dbt invocation, streams its output line by line, and stops it on cancel or timeout:
//! SIGTERM to the whole tree, a grace period, then SIGKILL.
//!
//! With a [`Prepared`] sandbox the agent starts its own binary as the sandbox wrapper (see
//! `sandbox::exec`), which leads its own session; the tree is the wrapper's process group, the
//! build's cgroup and the PID namespace. Without one (unit tests), the child leads a process
//! group of its own. Either way: the child starts with a cleared environment plus what the
//! caller passes, and no process of the tree outlives the call.
//!
//! Every child is spawned from one long-lived thread of its own: the parent-death signal the
//! sandbox wrapper sets fires when the *thread* that forked it exits, and tokio's blocking pool
//! retires idle threads.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Mutex, OnceLock, mpsc as std_mpsc};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use slimci_proto::SandboxReport;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sandbox::{Message, Prepared, exec};

/// Longest line passed on; the rest of a longer line is dropped with a note.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// How long the agent waits, after the tree's leader exited, for the rest of its cgroup to go.
const CGROUP_DRAIN: Duration = Duration::from_secs(5);

pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The child's whole environment.
    pub env: Vec<(String, String)>,
    /// When it is stopped as timed out.
    pub deadline: Deadline,
    pub grace: Duration,
    /// Runs it in the sandbox; `program`, `args`, `cwd` and `env` are then the spec's.
    pub sandbox: Option<Prepared>,
}

/// When an invocation times out.
#[derive(Debug, Clone)]
pub enum Deadline {
    /// At this instant.
    At(Instant),
    /// When this token is cancelled: a deadline set after the start (pre-started dbt, whose
    /// build's deadline arrives with the build).
    Later(CancellationToken),
}

impl Deadline {
    /// Returns once the deadline has passed.
    async fn passed(&self) {
        match self {
            Deadline::At(instant) => tokio::time::sleep_until(*instant).await,
            Deadline::Later(token) => token.cancelled().await,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Killed by a signal nobody here sent.
    Signal(i32),
    TimedOut,
    Cancelled,
}

/// How an invocation ended, and what the sandbox saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub exit: Exit,
    /// What the sandbox applied (none without a sandbox, or if it never reported).
    pub report: Option<SandboxReport>,
    /// Why the sandbox did not start dbt.
    pub sandbox_error: Option<String>,
    /// Processes of the build the kernel's OOM killer killed (cgroup memory limit).
    pub oom_kills: u64,
    /// Forks refused by the cgroup pids limit.
    pub pids_limit_hits: u64,
    /// The limits in force, for messages.
    pub memory_limit: Option<u64>,
    pub pids_limit: Option<u64>,
}

impl Ran {
    fn plain(exit: Exit) -> Ran {
        Ran {
            exit,
            report: None,
            sandbox_error: None,
            oom_kills: 0,
            pids_limit_hits: 0,
            memory_limit: None,
            pids_limit: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("waiting for the build process: {0}")]
    Wait(#[source] std::io::Error),
}

type SpawnRequest = (
    tokio::process::Command,
    tokio::runtime::Handle,
    oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

/// Spawns `command` from the agent's one spawning thread, which never exits.
async fn spawn(command: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    static SPAWNER: OnceLock<Mutex<std_mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (sender, requests) = std_mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("slimci-spawner".into())
            .spawn(move || {
                for (mut command, runtime, answer) in requests {
                    // The child registers with the caller's runtime (its SIGCHLD handling).
                    let _entered = runtime.enter();
                    let _ = answer.send(command.spawn());
                }
            })
            .expect("start the spawning thread");
        Mutex::new(sender)
    });
    let (answer, spawned) = oneshot::channel();
    sender
        .lock()
        .expect("spawner lock")
        .send((command, tokio::runtime::Handle::current(), answer))
        .map_err(|_| std::io::Error::other("the spawning thread is gone"))?;
    spawned
        .await
        .map_err(|_| std::io::Error::other("the spawning thread dropped the request"))?
}

async fn forward_lines<R: AsyncRead + Unpin>(reader: R, lines: mpsc::Sender<String>) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut buffer = Vec::with_capacity(4096);
    loop {
        buffer.clear();
        // Read one line, keeping at most MAX_LINE_BYTES of it in memory.
        let mut dropped = 0usize;
        let mut ended = false;
        loop {
            let available = match reader.fill_buf().await {
                Ok(bytes) => bytes,
                Err(_) => {
                    ended = true;
                    break;
                }
            };
            if available.is_empty() {
                ended = true;
                break;
            }
            let (chunk, found_newline) = match available.iter().position(|&byte| byte == b'\n') {
                Some(at) => (&available[..at], true),
                None => (available, false),
            };
            let room = MAX_LINE_BYTES.saturating_sub(buffer.len());
            let keep = chunk.len().min(room);
            buffer.extend_from_slice(&chunk[..keep]);
            dropped += chunk.len() - keep;
            let consumed = chunk.len() + usize::from(found_newline);
            reader.consume(consumed);
            if found_newline {
                break;
            }
        }
        if ended && buffer.is_empty() && dropped == 0 {
            return;
        }
        let mut line = String::from_utf8_lossy(&buffer).into_owned();
        if dropped > 0 {
            line.push_str(&format!(
                " [slimci: {dropped} more bytes of this line dropped]"
            ));
        }
        if lines.send(line).await.is_err() || ended {
            return;
        }
    }
}

/// The sandbox stages' messages: the report, then dbt's exit.
#[derive(Default)]
struct Messages {
    applied: Option<exec::Applied>,
    exit: Option<(Option<i32>, Option<i32>)>,
}

async fn read_messages(socket: std::os::unix::net::UnixStream) -> Messages {
    let mut messages = Messages::default();
    if socket.set_nonblocking(true).is_err() {
        return messages;
    }
    let Ok(socket) = tokio::net::UnixStream::from_std(socket) else {
        return messages;
    };
    let mut lines = BufReader::new(socket).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Message>(&line) {
            Ok(Message::Report(applied)) if messages.applied.is_none() => {
                messages.applied = Some(applied);
            }
            Ok(Message::Exit { code, signal }) => messages.exit = Some((code, signal)),
            _ => {}
        }
    }
    messages
}

/// The process tree of one invocation, for signals.
struct Tree<'a> {
    leader: i32,
    sandbox: Option<&'a Prepared>,
}

impl Tree<'_> {
    fn signal(&self, signal: Signal) {
        // ESRCH (already gone) is the expected case after a clean exit.
        let _ = killpg(Pid::from_raw(self.leader), signal);
        // The wrapper may not lead its group yet (it calls setsid first thing).
        let _ = kill(Pid::from_raw(self.leader), signal);
        if let Some(cgroup) = self.sandbox.and_then(|s| s.cgroup.as_ref()) {
            if signal == Signal::SIGKILL {
                // The v1 freezer may take a moment to freeze a tree that forks.
                let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread;
                if multi_thread {
                    tokio::task::block_in_place(|| cgroup.kill_all());
                } else {
                    cgroup.kill_all();
                }
            } else {
                cgroup.signal_all(signal);
            }
        }
    }
}

/// Runs the invocation to its end. Output lines (stdout and stderr, interleaved as they come)
/// go to `lines`, which is closed when both streams are.
pub async fn run(
    invocation: Invocation,
    lines: mpsc::Sender<String>,
    cancel: &CancellationToken,
) -> Result<Ran, ProcessError> {
    let program_name = invocation.program.display().to_string();
    let spawn_error = |source| ProcessError::Spawn {
        program: program_name.clone(),
        source,
    };
    let (mut command, socket) = match &invocation.sandbox {
        None => {
            let mut command = tokio::process::Command::new(&invocation.program);
            command
                .args(&invocation.args)
                .current_dir(&invocation.cwd)
                .env_clear()
                .envs(
                    invocation
                        .env
                        .iter()
                        .map(|(key, value)| (key.as_str(), value.as_str())),
                )
                .stdin(Stdio::null())
                .process_group(0);
            (command, None)
        }
        Some(prepared) => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_error)?;
            // The agent's own binary, even if it was replaced on disk since it started.
            let mut command = tokio::process::Command::new("/proc/self/exe");
            command
                .arg(exec::WRAPPER_ARG)
                .env_clear()
                .env(
                    exec::SPEC_ENV,
                    serde_json::to_string(&prepared.spec).expect("spec serializes"),
                )
                .stdin(Stdio::from(OwnedFd::from(theirs)));
            (command, Some(ours))
        }
    };
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = spawn(command).await.map_err(spawn_error)?;
    let tree = Tree {
        leader: child.id().expect("a just-spawned child has a pid") as i32,
        sandbox: invocation.sandbox.as_ref(),
    };
    let messages = socket.map(|socket| tokio::spawn(read_messages(socket)));
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let readers = [
        tokio::spawn(forward_lines(stdout, lines.clone())),
        tokio::spawn(forward_lines(stderr, lines)),
    ];

    // Some(exit): the leader ended by itself; None: we stop it, for `stopped_because`.
    let mut stopped_because = None;
    let ended = tokio::select! {
        status = child.wait() => Some(status.map_err(ProcessError::Wait)?),
        () = invocation.deadline.passed() => {
            stopped_because = Some(Exit::TimedOut);
            None
        }
        () = cancel.cancelled() => {
            stopped_because = Some(Exit::Cancelled);
            None
        }
    };
    let status = match ended {
        Some(status) => status,
        None => {
            tree.signal(Signal::SIGTERM);
            match tokio::time::timeout(invocation.grace, child.wait()).await {
                Ok(status) => status.map_err(ProcessError::Wait)?,
                Err(_) => {
                    tracing::info!(
                        leader = tree.leader,
                        "build did not stop within the grace period; killing its process tree"
                    );
                    tree.signal(Signal::SIGKILL);
                    child.wait().await.map_err(ProcessError::Wait)?
                }
            }
        }
    };
    // Stragglers: whatever is left of the tree dies now.
    tree.signal(Signal::SIGKILL);
    let mut ran = Ran::plain(stopped_because.unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Signal(0),
        }
    }));
    if let Some(prepared) = invocation.sandbox {
        let messages = match messages {
            Some(task) => tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => Messages::default(),
        };
        // dbt's own exit, as init saw it, rather than the wrapper's echo of it.
        if stopped_because.is_none()
            && let Some((code, signal)) = messages.exit
        {
            ran.exit = match (code, signal) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(signal)) => Exit::Signal(signal),
                (None, None) => ran.exit,
            };
        }
        if let Some(applied) = &messages.applied {
            ran.report = Some(prepared.report(applied));
            ran.sandbox_error = applied.error.clone();
        } else if ran.exit == Exit::Code(exec::SETUP_FAILED) {
            ran.sandbox_error = Some("the sandbox wrapper exited before reporting".to_owned());
        }
        let prepared = tokio::task::spawn_blocking(move || {
            if let Some(cgroup) = &prepared.cgroup
                && !cgroup.wait_empty(CGROUP_DRAIN)
            {
                tracing::warn!(?cgroup, "processes of a build survived every kill");
            }
            prepared
        })
        .await
        .map_err(|error| ProcessError::Wait(std::io::Error::other(error)))?;
        if let Some(cgroup) = &prepared.cgroup {
            ran.oom_kills = cgroup.oom_kills();
            ran.pids_limit_hits = cgroup.pids_limit_hits();
            ran.memory_limit = cgroup.memory_limit;
            ran.pids_limit = cgroup.pids_limit;
            cgroup.remove();
        }
    }
    finish_readers(readers).await;
    Ok(ran)
}

/// Waits briefly for the output readers; a process that escaped the tree could hold the pipes
/// open forever, and must not hold up the report.
async fn finish_readers(readers: [tokio::task::JoinHandle<()>; 2]) {
    for reader in readers {
        let abort = reader.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str, deadline: Duration) -> Invocation {
        Invocation {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            deadline: Deadline::At(Instant::now() + deadline),
            grace: Duration::from_millis(300),
            sandbox: None,
        }
    }

    async fn collect(invocation: Invocation, cancel: &CancellationToken) -> (Exit, Vec<String>) {
        let (sender, mut receiver) = mpsc::channel(1024);
        let exit = run(invocation, sender, cancel).await.unwrap().exit;
        let mut lines = Vec::new();
        while let Some(line) = receiver.recv().await {
            lines.push(line);
        }
        (exit, lines)
    }

    #[tokio::test]
    async fn exit_codes_and_output_come_back() {
        let (exit, lines) = collect(
            shell("echo one; echo two >&2; exit 3", Duration::from_secs(10)),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(exit, Exit::Code(3));
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(sorted, vec!["one", "two"]);
    }

    #[tokio::test]
    async fn the_environment_is_only_what_was_passed() {
        // SAFETY-free: the test reads the child's view, not ours.
        let (_, lines) = collect(
            shell("env", Duration::from_secs(10)),
            &CancellationToken::new(),
        )
        .await;
        assert!(
            lines.iter().all(|line| line.starts_with("PATH=")
                || line.starts_with("PWD=")
                || line.starts_with("SHLVL=")
                || line.starts_with("_=")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let started = std::time::Instant::now();
        let (exit, _) = collect(
            shell(
                "trap '' TERM; sleep 30 & sleep 30; wait",
                Duration::from_millis(300),
            ),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(exit, Exit::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn cancel_stops_the_build() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            trigger.cancel();
        });
        let (exit, lines) = collect(
            shell("echo started; sleep 30", Duration::from_secs(30)),
            &cancel,
        )
        .await;
        assert_eq!(exit, Exit::Cancelled);
        assert_eq!(lines, vec!["started"]);
    }

    #[tokio::test]
    async fn huge_lines_are_cut_and_bad_utf8_survives() {
        let script = "head -c 200000 /dev/zero | tr '\\0' x; echo; printf '\\377ok\\n'";
        let (_, lines) = collect(
            shell(script, Duration::from_secs(10)),
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(
            lines.len(),
            2,
            "{:?}",
            lines.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        assert!(lines[0].starts_with(&"x".repeat(1000)));
        assert!(
            lines[0].ends_with("more bytes of this line dropped]"),
            "{}",
            &lines[0][lines[0].len() - 60..]
        );
        assert_eq!(lines[1], "\u{fffd}ok");
    }
}
