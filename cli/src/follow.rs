//! Following a run to its end: its log streamed live (resuming after a dropped connection from
//! the last line seen), its progress on a terminal, and, while it waits in the queue, why
//! (no agent connected, or runs ahead of it), at most every 15 s.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use slimci_client::{Client, LogEvent, RunStatus};
use slimci_proto::RunId;
use tokio::time::Instant;

use crate::print::{exit_code, print_summary};

/// The first look at a run that has not started, after following it this long.
const FIRST_WAIT_NOTICE: Duration = Duration::from_secs(5);
/// Then again this often, while it still waits.
const WAIT_NOTICE_EVERY: Duration = Duration::from_secs(15);

/// Streams the run's log until it ends, prints the summary, and exits with the run's result.
pub async fn follow_to_the_end(client: &Client, id: RunId) -> anyhow::Result<ExitCode> {
    follow_run(client, id).await?;
    let run = client.run(id).await?;
    print_summary(&run);
    Ok(exit_code(run.status))
}

/// Streams the run's log (server-sent events) until the `end` event, resuming after a dropped
/// connection from the last line seen.
async fn follow_run(client: &Client, id: RunId) -> anyhow::Result<()> {
    let progress_to_terminal = std::io::stderr().is_terminal();
    let mut last_line: u64 = 0;
    let mut failures = 0;
    let mut next_wait_notice = Instant::now() + FIRST_WAIT_NOTICE;
    loop {
        let mut stream = match client.follow_logs(id, last_line).await {
            Ok(stream) => stream,
            Err(error) if failures < 30 => {
                failures += 1;
                let error = anyhow::Error::from(error);
                eprintln!("slimci: lost the log stream ({error:#}); reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        failures = 0;
        let mut progress_shown = false;
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                () = tokio::time::sleep_until(next_wait_notice) => {
                    explain_wait(client, id).await;
                    next_wait_notice = Instant::now() + WAIT_NOTICE_EVERY;
                    continue;
                }
            };
            let Some(event) = event else { break };
            match event {
                LogEvent::Line { number, text } => {
                    if progress_shown {
                        eprint!("\r\x1b[K");
                        progress_shown = false;
                    }
                    let _ = writeln!(std::io::stdout().lock(), "{text}");
                    if let Some(number) = number {
                        last_line = number;
                    }
                }
                LogEvent::Progress(progress) if progress_to_terminal => {
                    let _ = std::io::stdout().lock().flush();
                    eprint!("\r\x1b[K[{}/{} nodes done]", progress.done, progress.total);
                    progress_shown = true;
                }
                LogEvent::Progress(_) => {}
                LogEvent::End(_) => {
                    if progress_shown {
                        eprintln!();
                    }
                    return Ok(());
                }
            }
        }
        // The stream closed without `end`: the coordinator restarted or the connection broke.
        if client.run(id).await?.status.is_terminal() && failures > 0 {
            return Ok(());
        }
        failures += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Says why the run has not started, if it has not. A failed look says nothing: the log
/// stream reports a lost coordinator.
async fn explain_wait(client: &Client, id: RunId) {
    let Ok(run) = client.run(id).await else {
        return;
    };
    if run.status != RunStatus::Queued {
        return;
    }
    if let Some(waiting) = run.waiting {
        eprintln!("slimci: {}", waiting.explain());
    }
}
