//! Memory (measurement 6): the agent's RSS when idle (after start-up and after 20 runs), and the
//! coordinator's after a restart on a store filled to 10,000 finished runs (`memory_fill.py` copies
//! real runs) and read as people and the CLI would.

use std::process::Command;
use std::time::Duration;

use anyhow::ensure;
use slimci_client::RunStatus;
use slimci_tests::ci_request;
use slimci_tests::measure::{mb, status_field, status_kb};

use crate::Args;
use crate::cluster::{deploy, stub_cluster};
use crate::report::verdict;

const AGENT_RSS_TARGET_MB: f64 = 30.0;
const COORDINATOR_RSS_TARGET_MB: f64 = 80.0;

/// Fills the stopped coordinator's store up to `target` runs by copying its finished CI runs
/// (row, phases, nodes, artifacts, log files) under new ids, older PR numbers and earlier times.
/// Arguments: the database, the logs directory, the target.
const FILL_SCRIPT: &str = include_str!("memory_fill.py");

/// `12.3 MB anonymous + 4.5 MB file-backed`: what a process's RSS is made of.
fn rss_parts(pid: i32) -> String {
    format!(
        "{:.1} MB anonymous + {:.1} MB file-backed",
        mb(status_kb(pid, "RssAnon")),
        mb(status_kb(pid, "RssFile"))
    )
}

/// The memory figures, VmRSS in kB.
pub struct Memory {
    /// The agent's, idle: the larger of after start-up and after 20 runs.
    pub agent_idle_kb: Option<u64>,
    /// The coordinator's, holding the filled store after being read.
    pub coordinator_kb: Option<u64>,
}

/// Runs the memory measurement.
pub async fn memory(args: &Args) -> anyhow::Result<Memory> {
    let mut cluster = stub_cluster(1, 2, "", "").await?;
    let agent_pid = cluster.agents[0].pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent_start = status_kb(agent_pid, "VmRSS");
    let coordinator_start = status_kb(cluster.coordinator.pid(), "VmRSS");
    deploy(&mut cluster, None).await?;
    // A couple of real runs, which the fill below copies.
    let sha = cluster.origin.main_sha()?;
    let mut ids = Vec::new();
    for pr in 1..=20u64 {
        cluster.origin.point_pull_request(pr, &sha)?;
        ids.push(cluster.create_run(&ci_request(pr, &sha)).await?.id);
    }
    for id in &ids {
        let run = cluster.wait_for_run(*id, Duration::from_secs(60)).await?;
        ensure!(run.status == RunStatus::Success, "run {id}: {run:?}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_after = status_kb(agent_pid, "VmRSS");
    let agent_after_hwm = status_kb(agent_pid, "VmHWM");
    let agent_parts = format!(
        "{} (its binary and libraries), {} threads",
        rss_parts(agent_pid),
        status_field(agent_pid, "Threads").unwrap_or_default()
    );
    let coordinator_after = status_kb(cluster.coordinator.pid(), "VmRSS");

    cluster.coordinator.stop(Duration::from_secs(10));
    let data = cluster.dir.path().join("coordinator");
    let output = Command::new(slimci_tests::python())
        .arg("-c")
        .arg(FILL_SCRIPT)
        .arg(data.join("slimci.db"))
        .arg(data.join("logs"))
        .arg(args.stored_runs.to_string())
        .output()?;
    ensure!(
        output.status.success(),
        "filling the store: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let filled = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    cluster.restart_coordinator().await?;
    let pid = cluster.coordinator.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = status_kb(pid, "VmRSS");
    // Read it as people and the CLI would.
    // The coordinator's default page (50 runs), as `GET /api/v1/runs` without a limit.
    cluster.runs_where(None, 50).await?;
    let mut listed = Vec::new();
    for _ in 0..3 {
        listed = cluster.runs().await?;
    }
    cluster.runs_where(Some(RunStatus::Success), 1000).await?;
    cluster.client.repositories().await?;
    for run in listed.iter().step_by(100) {
        cluster.run(run.id).await?;
        cluster.log(run.id).await?;
    }
    let total = listed.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let coordinator_kb = status_kb(pid, "VmRSS");
    let coordinator_hwm = status_kb(pid, "VmHWM");
    let coordinator_parts = rss_parts(pid);
    let agent_idle_kb = agent_start.max(agent_after);
    let agent_mb = mb(agent_idle_kb);
    let coordinator_mb = mb(coordinator_kb);
    println!("\n== 6. memory (VmRSS from /proc/<pid>/status)");
    println!(
        "agent idle RSS                           {:.1} MB after start-up, {:.1} MB after 20 runs (peak {:.1} MB)   target < {AGENT_RSS_TARGET_MB} MB: {}",
        mb(agent_start),
        mb(agent_after),
        mb(agent_after_hwm),
        verdict(agent_mb < AGENT_RSS_TARGET_MB)
    );
    println!("  agent after the runs: {agent_parts}");
    println!(
        "coordinator RSS with {} runs stored     {:.1} MB (peak {:.1} MB)   target < {COORDINATOR_RSS_TARGET_MB} MB: {}",
        args.stored_runs,
        coordinator_mb,
        mb(coordinator_hwm),
        verdict(coordinator_mb < COORDINATOR_RSS_TARGET_MB)
    );
    println!("  coordinator with the filled store: {coordinator_parts}");
    println!(
        "  coordinator: {:.1} MB at start-up, {:.1} MB after 20 runs, {:.1} MB just after the restart on the filled store (copied runs, total: {filled}); then listed {total} runs x3 and read {} runs and logs",
        mb(coordinator_start),
        mb(coordinator_after),
        mb(restarted),
        total.div_ceil(100)
    );
    Ok(Memory {
        agent_idle_kb,
        coordinator_kb,
    })
}
