//! The fault storm: many runs on several agents with the stub dbt, while agents are killed with
//! SIGKILL and restarted, the broker is restarted once and the coordinator once. It checks that
//! every run ends terminal, none is lost, and that no two attempts of one run ever overlapped,
//! from the stub's own records (every attempt writes start, a proof of life every 100 ms, end).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use slimci_client::RunStatus;
use slimci_proto::RunKind;

use crate::broker::PrivateBroker;
use crate::{Cluster, ClusterOptions, binary, ci_request};

pub struct StormConfig {
    pub runs: usize,
    pub agents: usize,
    pub slots: u16,
    pub build_ms: u64,
    /// How often a random agent is killed (and restarted).
    pub kill_every: Duration,
    pub deadline: Duration,
}

#[derive(Debug, Default)]
pub struct StormReport {
    pub runs: usize,
    pub terminal: usize,
    pub lost: usize,
    pub overlapping: usize,
    pub retries: u64,
    pub max_attempts_of_a_run: u32,
    pub max_concurrent_attempts_per_run: usize,
    pub kills: usize,
    pub drain_s: f64,
    pub by_status: BTreeMap<String, usize>,
}

impl StormReport {
    pub fn print(&self) {
        println!("runs submitted              {}", self.runs);
        println!("runs terminal               {}", self.terminal);
        for (status, count) in &self.by_status {
            println!("  {status:<26}{count}");
        }
        println!("runs lost                   {}", self.lost);
        println!("agents killed (SIGKILL)     {}", self.kills);
        println!("retries (extra attempts)    {}", self.retries);
        println!("most attempts of one run    {}", self.max_attempts_of_a_run);
        println!(
            "max concurrent attempts/run {}",
            self.max_concurrent_attempts_per_run
        );
        println!("overlapping attempt pairs   {}", self.overlapping);
        println!("time to drain               {:.1} s", self.drain_s);
        println!(
            "faults runs={} terminal={} lost={} overlapping={} retries={} drain_s={:.1}",
            self.runs, self.terminal, self.lost, self.overlapping, self.retries, self.drain_s
        );
    }
}

pub async fn storm(config: StormConfig) -> anyhow::Result<StormReport> {
    let mut broker = PrivateBroker::start(1_800_000).await?;
    let mut cluster = Cluster::start(ClusterOptions {
        agents: config.agents,
        slots: config.slots,
        amqp_url: Some(broker.url()),
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(crate::workspace_root().join("tests/fixtures/stub")),
        coordinator_toml: "[reliability]\nlease_secs = 3\nmax_attempts = 6\n".to_owned(),
        ..Default::default()
    })
    .await?;
    let record = crate::record_file();
    let stub =
        json!({ "duration_ms": config.build_ms, "nodes": 3, "log_lines": 20, "record": record });
    cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub.to_string())?;
    cluster.deploy().await.context("the first deploy")?;
    let sha = cluster.origin.main_sha()?;
    for pr in 1..=config.runs as u64 {
        cluster.origin.point_pull_request(pr, &sha)?;
    }
    let started = Instant::now();
    let mut ids = Vec::new();
    for pr in 1..=config.runs as u64 {
        let run = cluster
            .create_run(&ci_request(pr, &sha))
            .await
            .with_context(|| format!("run {pr}"))?;
        ids.push(run.id);
    }
    let mut report = StormReport {
        runs: ids.len(),
        ..Default::default()
    };
    let mut broker_restarted = false;
    let mut coordinator_restarted = false;
    let mut next_kill = Instant::now() + Duration::from_secs(1);
    let deadline = Instant::now() + config.deadline;
    loop {
        let runs = cluster.runs().await.unwrap_or_default();
        let done = runs
            .iter()
            .filter(|run| run.kind == RunKind::Ci && run.status.is_terminal())
            .count();
        if done == ids.len() {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        if !broker_restarted && done >= ids.len() / 3 {
            println!("restarting RabbitMQ ({done} of {} runs done)", ids.len());
            broker.restart().await?;
            broker_restarted = true;
        } else if !coordinator_restarted && done >= ids.len() * 2 / 3 {
            println!(
                "restarting the coordinator ({done} of {} runs done)",
                ids.len()
            );
            cluster.restart_coordinator().await?;
            coordinator_restarted = true;
        } else if Instant::now() >= next_kill {
            let victim = (uuid::Uuid::new_v4().as_u128() % cluster.agents.len() as u128) as usize;
            cluster.kill_agent(victim);
            report.kills += 1;
            cluster.restart_agent(victim)?;
            next_kill = Instant::now() + config.kill_every;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.drain_s = started.elapsed().as_secs_f64();
    for id in &ids {
        let run = cluster.run(*id).await?;
        let attempts = run.attempt.0;
        report.retries += u64::from(attempts.saturating_sub(1));
        report.max_attempts_of_a_run = report.max_attempts_of_a_run.max(attempts);
        if run.status.is_terminal() {
            report.terminal += 1;
        } else {
            report.lost += 1;
        }
        if run.status == RunStatus::Error && !report.by_status.contains_key("error") {
            println!("first error: {:?}", run.message);
        }
        *report
            .by_status
            .entry(run.status.as_str().to_owned())
            .or_default() += 1;
    }
    let mut overlapped = Vec::new();
    for (run, spans) in crate::attempt_spans(&record) {
        let mut concurrent = 1;
        for (index, a) in spans.iter().enumerate() {
            let mut here = 1;
            for b in &spans[index + 1..] {
                if a.0 <= b.1 && b.0 <= a.1 {
                    report.overlapping += 1;
                    here += 1;
                }
            }
            concurrent = concurrent.max(here);
        }
        if concurrent > 1 {
            overlapped.push(run);
        }
        report.max_concurrent_attempts_per_run =
            report.max_concurrent_attempts_per_run.max(concurrent);
    }
    // What the stub recorded of the runs whose attempts overlapped, to tell why.
    let records = std::fs::read_to_string(&record).unwrap_or_default();
    for run in &overlapped {
        println!("attempts of run {run} overlapped; the stub's records of it:");
        for line in records.lines().filter(|line| line.contains(run.as_str())) {
            println!("  {line}");
        }
    }
    let _ = std::fs::remove_file(&record);
    drop(cluster);
    broker.stop()?;
    Ok(report)
}
