//! Cancel latency (measurement 2): a newer commit of a PR supersedes its building run; from the
//! newer commit's POST until the old build's stub dbt is gone, with the agent's `cancelling`, the
//! old run's end and the newer build's start on the way.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde_json::json;
use slimci_client::RunStatus;
use slimci_tests::measure::{ms_of, now_ms, p50, pids, process_gone, stub_event, stub_records};
use slimci_tests::{ci_request, wait_for};

use crate::Args;
use crate::cluster::{Record, deploy, pr_commit, print_logs, stub_cluster};
use crate::report::{spread, verdict};

const CANCEL_TARGET_MS: f64 = 1000.0;

/// The host pid of the stub dbt building `run` (its working directory is in the run's
/// directory; the pid in its records is the one inside the build's PID namespace).
fn stub_pid(run: &str) -> Option<i32> {
    let marker = format!("/runs/{run}-");
    pids().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("slimci-stub-dbt"))
            && std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd.to_string_lossy().contains(&marker))
    })
}

/// Polls every millisecond until `pid` is gone (or a zombie); returns when, or none by `until`.
fn wait_gone(pid: i32, until: Instant) -> Option<i64> {
    loop {
        if process_gone(pid) {
            return Some(now_ms());
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// When the agent logged `cancelling` for `run` (its log's own timestamp).
fn agent_cancelling_ms(log: &Path, run: &str) -> Option<i64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|line| line.contains("cancelling") && line.contains(run))?;
    // Strip the colour codes, then the first word is the RFC 3339 time.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    ms_of(plain.split_whitespace().next()?)
}

/// The cancel latencies of the repetitions, each from the newer commit's POST, in ms.
#[derive(Default)]
struct CancelFigures {
    /// ... until the old build's dbt was gone: the figure.
    gone: Vec<f64>,
    /// ... until the agent logged `cancelling` the old build.
    to_agent: Vec<f64>,
    /// ... until the old run was recorded finished (superseded).
    superseded: Vec<f64>,
    /// ... until the newer run's dbt started.
    next_started: Vec<f64>,
}

impl CancelFigures {
    fn print(&self) {
        println!(
            "newer commit POSTed -> old dbt gone      {}   target < {CANCEL_TARGET_MS} ms: {}",
            spread(&self.gone),
            verdict(p50(&self.gone) < CANCEL_TARGET_MS)
        );
        println!(
            "  -> agent logs `cancelling`             {}",
            spread(&self.to_agent)
        );
        println!(
            "  -> old run's Finished (superseded)     {}",
            spread(&self.superseded)
        );
        println!(
            "  -> newer run's dbt started             {}",
            spread(&self.next_started)
        );
    }
}

/// Runs the cancel measurement; its figure, the p50 in ms.
pub async fn cancel(args: &Args) -> anyhow::Result<f64> {
    let mut cluster = stub_cluster(1, 2, "", "").await?;
    let record = Record::new();
    deploy(&mut cluster, None).await?;
    let long = |seq: usize| json!({ "duration_ms": 600_000, "nodes": 3, "log_lines": 5, "record": record.0, "seq": seq });
    let pr = 7;
    let wait_started = |id: String| {
        let path = record.0.clone();
        async move {
            wait_for(
                &format!("run {id}'s stub to start"),
                Duration::from_secs(60),
                || {
                    let found = stub_event(&stub_records(&path), &id, "start");
                    async move { Ok(found) }
                },
            )
            .await
        }
    };
    let sha = pr_commit(&cluster, pr, &long(0))?;
    let mut building = cluster.create_run(&ci_request(pr, &sha)).await?.id;
    wait_started(building.to_string()).await?;
    let mut figures = CancelFigures::default();
    for seq in 1..=args.cancel_reps {
        // The old build is commit seq - 1. Let it settle into its run, as a real superseded build
        // would have.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let old = building;
        let pid = wait_for(
            &format!("run {old}'s stub process"),
            Duration::from_secs(10),
            || {
                let found = stub_pid(&old.to_string());
                async move { Ok(found) }
            },
        )
        .await?;
        let sha = pr_commit(&cluster, pr, &long(seq))?;
        let watcher = tokio::task::spawn_blocking(move || {
            wait_gone(pid, Instant::now() + Duration::from_secs(60))
        });
        let submitted = now_ms();
        let newer = cluster.create_run(&ci_request(pr, &sha)).await?.id;
        let Some(ended) = watcher.await? else {
            print_logs(&cluster);
            bail!("run {old}'s stub (pid {pid}) outlived its cancel by 60 s");
        };
        figures.gone.push((ended - submitted) as f64);
        let old_run = cluster.wait_for_run(old, Duration::from_secs(30)).await?;
        ensure!(
            old_run.status == RunStatus::Superseded,
            "the old run ended {}",
            old_run.status
        );
        if let Some(finished) = old_run.finished_at.as_deref().and_then(ms_of) {
            figures.superseded.push((finished - submitted) as f64);
        }
        if let Some(cancelling) = agent_cancelling_ms(&cluster.agents[0].log, &old.to_string()) {
            figures.to_agent.push((cancelling - submitted) as f64);
        }
        let started = wait_started(newer.to_string()).await?;
        figures.next_started.push((started - submitted) as f64);
        building = newer;
    }
    let _ = cluster.client.cancel(building).await;
    println!(
        "\n== 2. cancel latency: {} newer commits superseding a building run (the stub exits at once on SIGTERM; sandbox.grace_secs = 5 in the harness, 10 by default)",
        figures.gone.len()
    );
    figures.print();
    Ok(p50(&figures.gone))
}
