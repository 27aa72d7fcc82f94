//! Runs one dbt invocation as its own process group, streams its output line by line, and
//! stops it on cancel or timeout: SIGTERM to the group, a grace period, then SIGKILL.
//!
//! The full sandbox (namespaces, cgroups, landlock, another user) wraps this in its own module;
//! here the guarantees are: the child starts with a cleared environment plus what the caller
//! passes, in its own process group, and no process of that group outlives the call.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest line passed on; the rest of a longer line is dropped with a note.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The child's whole environment.
    pub env: Vec<(String, String)>,
    pub deadline: Instant,
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Killed by a signal nobody here sent.
    Signal(i32),
    TimedOut,
    Cancelled,
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

fn signal_group(pgid: i32, signal: Signal) {
    // ESRCH (group already gone) is the expected case after a clean exit.
    let _ = killpg(Pid::from_raw(pgid), signal);
}

/// Runs the invocation to its end. Output lines (stdout and stderr, interleaved as they come)
/// go to `lines`, which is closed when both streams are.
pub async fn run(
    invocation: Invocation,
    lines: mpsc::Sender<String>,
    cancel: &CancellationToken,
) -> Result<Exit, ProcessError> {
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
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
        program: invocation.program.display().to_string(),
        source,
    })?;
    let pgid = child.id().expect("a just-spawned child has a pid") as i32;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let readers = [
        tokio::spawn(forward_lines(stdout, lines.clone())),
        tokio::spawn(forward_lines(stderr, lines)),
    ];

    let stopped_because = tokio::select! {
        status = child.wait() => {
            let status = status.map_err(ProcessError::Wait)?;
            signal_group(pgid, Signal::SIGKILL);
            use std::os::unix::process::ExitStatusExt;
            let exit = match (status.code(), status.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(signal)) => Exit::Signal(signal),
                (None, None) => Exit::Signal(0),
            };
            finish_readers(readers).await;
            return Ok(exit);
        }
        () = tokio::time::sleep_until(invocation.deadline) => Exit::TimedOut,
        () = cancel.cancelled() => Exit::Cancelled,
    };

    signal_group(pgid, Signal::SIGTERM);
    let graceful = tokio::time::timeout(invocation.grace, child.wait()).await;
    if graceful.is_err() {
        tracing::info!(
            pgid,
            "build did not stop within the grace period; killing its process group"
        );
    }
    signal_group(pgid, Signal::SIGKILL);
    child.wait().await.map_err(ProcessError::Wait)?;
    finish_readers(readers).await;
    Ok(stopped_because)
}

/// Waits briefly for the output readers; a process that escaped the group could hold the pipes
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
            deadline: Instant::now() + deadline,
            grace: Duration::from_millis(300),
        }
    }

    async fn collect(invocation: Invocation, cancel: &CancellationToken) -> (Exit, Vec<String>) {
        let (sender, mut receiver) = mpsc::channel(1024);
        let exit = run(invocation, sender, cancel).await.unwrap();
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
