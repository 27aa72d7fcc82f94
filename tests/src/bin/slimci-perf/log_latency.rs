//! Log latency (measurement 3): a build's dbt prints stamped lines (`at_ms=`) some time apart; how
//! long until a `GET logs?follow=true` reader (SSE) and `slimci logs --follow` have each one.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::json;
use slimci_client::{Client, LogEvent, RunStatus};
use slimci_proto::RunId;
use slimci_tests::ci_request;
use slimci_tests::measure::{now_ms, p50, percentile};

use crate::Args;
use crate::cluster::{deploy, pr_commit, stub_cluster};
use crate::report::{spread, verdict};

const LOG_TARGET_MS: f64 = 300.0;

/// `at_ms=<n>` in a line.
fn stamped_ms(line: &str) -> Option<i64> {
    let rest = &line[line.find("at_ms=")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Follows the SSE log of a run; for each stamped line, when it arrived minus its stamp.
async fn follow_sse(client: Client, id: RunId, deadline: Duration) -> anyhow::Result<Vec<f64>> {
    let until = Instant::now() + deadline;
    let mut stream = client.follow_logs(id, 0).await.context("follow")?;
    let mut latencies = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.next())
            .await
            .context("following the log: deadline")?;
        let arrived = now_ms();
        match event {
            Some(LogEvent::Line { text, .. }) => {
                if let Some(stamp) = stamped_ms(&text) {
                    latencies.push((arrived - stamp) as f64);
                }
            }
            Some(LogEvent::Progress(_)) => {}
            Some(LogEvent::End(_)) | None => return Ok(latencies),
        }
    }
}

/// Runs `slimci logs <id> --follow` and times each stamped line it prints.
fn follow_cli(mut command: Command, deadline: Duration) -> anyhow::Result<Vec<f64>> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting slimci logs --follow")?;
    let stdout = child.stdout.take().expect("piped");
    let until = Instant::now() + deadline;
    let mut latencies = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let arrived = now_ms();
        let line = line?;
        if let Some(stamp) = stamped_ms(&line) {
            latencies.push((arrived - stamp) as f64);
        }
        if Instant::now() > until {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(latencies)
}

/// Runs the log latency measurement; its figure, the SSE p50 in ms.
pub async fn log_latency(args: &Args) -> anyhow::Result<f64> {
    let mut cluster = stub_cluster(1, 2, "", "").await?;
    deploy(&mut cluster, None).await?;
    let stub = json!({
        "duration_ms": 0, "nodes": 3, "log_lines": args.log_lines,
        "line_interval_ms": args.log_interval_ms,
    });
    let sha = pr_commit(&cluster, 3, &stub)?;
    let id = cluster.create_run(&ci_request(3, &sha)).await?.id;
    let deadline = Duration::from_millis(args.log_interval_ms * u64::from(args.log_lines))
        + Duration::from_secs(60);
    let sse = tokio::spawn(follow_sse(cluster.client.clone(), id, deadline));
    let mut command = cluster.cli();
    command.args(["logs", &id.to_string(), "--follow"]);
    let cli = tokio::task::spawn_blocking(move || follow_cli(command, deadline));
    let sse = sse.await??;
    let cli = cli.await??;
    let run = cluster.wait_for_run(id, Duration::from_secs(60)).await?;
    ensure!(run.status == RunStatus::Success, "the log run: {run:?}");
    ensure!(
        sse.len() == args.log_lines as usize,
        "saw {} of {} stamped lines over SSE",
        sse.len(),
        args.log_lines
    );
    let log_p50 = p50(&sse);
    println!(
        "\n== 3. log latency: {} lines {} ms apart, dbt's print -> seen by a follower",
        args.log_lines, args.log_interval_ms
    );
    println!(
        "GET logs?follow=true (SSE, reqwest)      {}   target < {LOG_TARGET_MS} ms: {}",
        spread(&sse),
        verdict(log_p50 < LOG_TARGET_MS && percentile(&sse, 90.0) < LOG_TARGET_MS)
    );
    println!("  slimci logs --follow (stdout)          {}", spread(&cli));
    Ok(log_p50)
}
