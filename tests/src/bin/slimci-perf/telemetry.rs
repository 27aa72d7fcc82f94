//! Telemetry's cost (measurement 7): the runner overhead (sequential CI runs, accepted → stub
//! dbt started) and the throughput (a burst of instant builds, wall time per run) with
//! OpenTelemetry export off, then on, exporting traces and metrics over OTLP/HTTP to a
//! receiver in this process (`slimci_tests::otlp`, which decodes every request as a collector
//! would). Target: the overhead p50 and the time per run within 5% of the figures with export
//! off. The two configurations alternate, so a change in the machine's load hits both.

use std::time::Duration;

use anyhow::ensure;
use serde_json::json;
use slimci_client::RunStatus;
use slimci_tests::measure::{ms_of, now_ms, p50, stub_event, stub_records};
use slimci_tests::otlp::OtlpReceiver;
use slimci_tests::{Cluster, ClusterOptions, binary, ci_request, wait_for, workspace_root};

use crate::Args;
use crate::cluster::{Record, deploy, pr_commit, print_logs};
use crate::report::{spread, verdict};

const TOLERANCE: f64 = 0.05;

/// The figures with export off and on.
pub struct TelemetryCost {
    pub overhead_off_ms: f64,
    pub overhead_on_ms: f64,
    pub per_run_off_ms: f64,
    pub per_run_on_ms: f64,
    pub spans_received: usize,
}

async fn cluster(
    receiver: Option<&OtlpReceiver>,
    agents: usize,
    slots: u16,
) -> anyhow::Result<Cluster> {
    let toml = receiver.map_or_else(String::new, |receiver| {
        format!(
            "[telemetry]\nenabled = true\nendpoint = \"{}\"\nmetrics_interval_secs = 5\n",
            receiver.url
        )
    });
    let cluster = Cluster::start(ClusterOptions {
        agents,
        slots,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        coordinator_toml: toml.clone(),
        agent_toml: toml,
        ..Default::default()
    })
    .await?;
    for agent in &cluster.agents {
        wait_for(
            &format!("{} to consume jobs", agent.name),
            Duration::from_secs(30),
            || async {
                Ok(std::fs::read_to_string(&agent.log)
                    .unwrap_or_default()
                    .contains("waiting for jobs")
                    .then_some(()))
            },
        )
        .await?;
    }
    Ok(cluster)
}

/// `runs` sequential CI runs; each one's time from acceptance to the stub's start, in ms.
async fn overhead_round(receiver: Option<&OtlpReceiver>, runs: usize) -> anyhow::Result<Vec<f64>> {
    let mut cluster = cluster(receiver, 1, 2).await?;
    let record = Record::new();
    deploy(&mut cluster, Some(&record)).await?;
    let stub = |seq: usize| json!({ "duration_ms": 0, "nodes": 3, "log_lines": 5, "record": record.0, "seq": seq });
    let mut runs_done = Vec::new();
    for seq in 0..=runs {
        let sha = pr_commit(&cluster, 1, &stub(seq))?;
        let run = cluster.create_run(&ci_request(1, &sha)).await?;
        let run = cluster
            .wait_for_run(run.id, Duration::from_secs(60))
            .await?;
        ensure!(run.status == RunStatus::Success, "run {seq}: {run:?}");
        // The first run warms the caches.
        if seq > 0 {
            runs_done.push(run);
        }
    }
    let records = stub_records(&record.0);
    let mut overheads = Vec::new();
    for run in &runs_done {
        let (Some(created), Some(started)) = (
            ms_of(&run.created_at),
            stub_event(&records, &run.id.to_string(), "start"),
        ) else {
            print_logs(&cluster);
            anyhow::bail!("run {} has no start record", run.id);
        };
        overheads.push((started - created) as f64);
    }
    exported(
        receiver,
        runs_done.iter().map(|run| run.id.to_string()).collect(),
    )
    .await?;
    Ok(overheads)
}

/// With export on, waits until the receiver holds a span of each run in `ids`: the exporters send
/// in batches every few seconds, and a cluster dropped before that would take its spans along.
async fn exported(receiver: Option<&OtlpReceiver>, ids: Vec<String>) -> anyhow::Result<()> {
    let Some(receiver) = receiver else {
        return Ok(());
    };
    wait_for(
        "every run's spans at the receiver",
        Duration::from_secs(60),
        || async {
            let spans = receiver.spans();
            Ok(ids
                .iter()
                .all(|id| {
                    spans
                        .iter()
                        .any(|span| span.attributes.get("cicd.pipeline.run.id") == Some(id))
                })
                .then_some(()))
        },
    )
    .await
}

/// `runs` instant builds queued at once on 2 agents × 2 slots; the wall time per run, in ms.
async fn throughput_round(receiver: Option<&OtlpReceiver>, runs: u64) -> anyhow::Result<f64> {
    let mut cluster = cluster(receiver, 2, 2).await?;
    deploy(&mut cluster, None).await?;
    let sha = cluster.origin.main_sha()?;
    for pr in 1..=runs {
        cluster.origin.point_pull_request(pr, &sha)?;
    }
    let first = now_ms();
    let mut ids = Vec::new();
    for pr in 1..=runs {
        ids.push(cluster.create_run(&ci_request(pr, &sha)).await?.id);
    }
    wait_for("the burst to finish", Duration::from_secs(600), || async {
        let queued = cluster.runs_where(Some(RunStatus::Queued), 1).await?;
        let running = cluster.runs_where(Some(RunStatus::Running), 1).await?;
        Ok((queued.is_empty() && running.is_empty()).then_some(()))
    })
    .await?;
    let last = cluster
        .runs()
        .await?
        .iter()
        .filter(|run| ids.contains(&run.id))
        .map(|run| {
            ensure!(run.status == RunStatus::Success, "{run:?}");
            Ok(run.finished_at.as_deref().and_then(ms_of).unwrap_or(first))
        })
        .collect::<anyhow::Result<Vec<i64>>>()?
        .into_iter()
        .max()
        .unwrap_or(first);
    exported(receiver, ids.iter().map(ToString::to_string).collect()).await?;
    Ok((last - first) as f64 / runs as f64)
}

pub async fn telemetry(args: &Args) -> anyhow::Result<TelemetryCost> {
    let receiver = OtlpReceiver::start().await?;
    let mut overhead_off = Vec::new();
    let mut overhead_on = Vec::new();
    let mut per_run_off = Vec::new();
    let mut per_run_on = Vec::new();
    // Off, on, off, on: the machine's drift lands on both.
    for _ in 0..args.telemetry_rounds {
        overhead_off.extend(overhead_round(None, args.overhead_runs).await?);
        overhead_on.extend(overhead_round(Some(&receiver), args.overhead_runs).await?);
        per_run_off.push(throughput_round(None, args.telemetry_burst).await?);
        per_run_on.push(throughput_round(Some(&receiver), args.telemetry_burst).await?);
    }
    ensure!(
        receiver.refused().is_empty(),
        "the receiver refused: {:?}",
        receiver.refused()
    );
    let spans_received = receiver.spans().len();
    ensure!(spans_received > 0, "export was on, but no span arrived");
    let cost = TelemetryCost {
        overhead_off_ms: p50(&overhead_off),
        overhead_on_ms: p50(&overhead_on),
        per_run_off_ms: p50(&per_run_off),
        per_run_on_ms: p50(&per_run_on),
        spans_received,
    };
    println!(
        "\n== 7. telemetry: export off vs on (OTLP/HTTP to a receiver in this process), {} rounds",
        args.telemetry_rounds
    );
    println!(
        "overhead, accepted -> stub dbt started, off  {}",
        spread(&overhead_off)
    );
    println!(
        "overhead, accepted -> stub dbt started, on   {}",
        spread(&overhead_on)
    );
    let overhead_ratio = cost.overhead_on_ms / cost.overhead_off_ms;
    println!(
        "  on/off {overhead_ratio:.3}   target within {:.0}%: {}",
        TOLERANCE * 100.0,
        verdict(overhead_ratio <= 1.0 + TOLERANCE)
    );
    println!(
        "throughput, {} instant builds on 2 agents x 2 slots, ms per run: off {}, on {}",
        args.telemetry_burst,
        spread(&per_run_off),
        spread(&per_run_on)
    );
    let per_run_ratio = cost.per_run_on_ms / cost.per_run_off_ms;
    println!(
        "  on/off {per_run_ratio:.3}   target within {:.0}%: {}",
        TOLERANCE * 100.0,
        verdict(per_run_ratio <= 1.0 + TOLERANCE)
    );
    println!("  spans received: {}", cost.spans_received);
    Ok(cost)
}
