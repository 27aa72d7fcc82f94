//! Runner overhead (measurement 1): sequential CI runs of one PR on a warm agent with free slots,
//! from the run's acceptance to the stub dbt's process start, and where that time goes step by step
//! (the run's phases and the stub's own start and end records).

use std::time::Duration;

use anyhow::{bail, ensure};
use serde_json::json;
use slimci_client::RunStatus;
use slimci_tests::ci_request;
use slimci_tests::measure::{ms_of, now_ms, p50, status_kb, stub_event, stub_records};

use crate::Args;
use crate::cluster::{Record, deploy, phase, pr_commit, stub_cluster};
use crate::report::{spread, verdict};

const OVERHEAD_TARGET_MS: f64 = 150.0;

/// The overhead figure (p50, ms) and the agent's RSS around the runs, in kB.
pub struct Overhead {
    pub p50: f64,
    pub agent_rss_start_kb: Option<u64>,
    pub agent_rss_after_kb: Option<u64>,
}

/// Runs the overhead measurement.
pub async fn overhead(args: &Args) -> anyhow::Result<Overhead> {
    let mut cluster = stub_cluster(1, 2, "", "").await?;
    let agent_pid = cluster.agents[0].pid();
    let agent_rss_start_kb = status_kb(agent_pid, "VmRSS");
    let record = Record::new();
    deploy(&mut cluster, Some(&record)).await?;
    let stub = |seq: usize| json!({ "duration_ms": 0, "nodes": 3, "log_lines": 5, "record": record.0, "seq": seq });
    // Warm: the git cache holds the repository and the production manifest is cached.
    let sha = pr_commit(&cluster, 1, &stub(0))?;
    let warm = cluster.create_run(&ci_request(1, &sha)).await?.id;
    let warm = cluster.wait_for_run(warm, Duration::from_secs(60)).await?;
    ensure!(warm.status == RunStatus::Success, "warm-up run: {warm:?}");

    let mut timed = Vec::new();
    for seq in 1..=args.overhead_runs {
        let sha = pr_commit(&cluster, 1, &stub(seq))?;
        let posted = now_ms();
        let run = cluster.create_run(&ci_request(1, &sha)).await?;
        let returned = now_ms();
        let id = run.id.to_string();
        let run = cluster
            .wait_for_run(run.id, Duration::from_secs(60))
            .await?;
        ensure!(run.status == RunStatus::Success, "run {seq}: {run:?}");
        timed.push((id, posted, returned, run));
    }
    let records = stub_records(&record.0);
    // The run's life as points in time; the segments between neighbours explain the overhead.
    let points = [
        "accepted (created_at)",
        "claimed (started_at)",
        "checkout started",
        "checkout finished",
        "state_fetch started",
        "state_fetch finished",
        "profile started",
        "profile finished",
        "build phase started",
        "stub dbt started",
        "stub dbt ended",
        "build phase finished",
        "upload started",
        "upload finished",
        "finished (finished_at)",
    ];
    let mut segments: Vec<Vec<f64>> = vec![Vec::new(); points.len() - 1];
    let mut from_created = Vec::new();
    let mut from_post = Vec::new();
    let mut from_post_return = Vec::new();
    let mut post_round_trip = Vec::new();
    for (id, posted, returned, run) in &timed {
        let (checkout_s, checkout_f) = phase(run, "checkout");
        let (state_s, state_f) = phase(run, "state_fetch");
        let (profile_s, profile_f) = phase(run, "profile");
        let (build_s, build_f) = phase(run, "build");
        let (upload_s, upload_f) = phase(run, "upload");
        let at = [
            ms_of(&run.created_at),
            run.started_at.as_deref().and_then(ms_of),
            checkout_s,
            checkout_f,
            state_s,
            state_f,
            profile_s,
            profile_f,
            build_s,
            stub_event(&records, id, "start"),
            stub_event(&records, id, "end"),
            build_f,
            upload_s,
            upload_f,
            run.finished_at.as_deref().and_then(ms_of),
        ];
        for (index, pair) in at.windows(2).enumerate() {
            if let [Some(from), Some(to)] = pair {
                segments[index].push((to - from) as f64);
            }
        }
        let (Some(created), Some(started)) = (at[0], at[9]) else {
            bail!("run {id} lacks its created_at or the stub's start record: {run:?}");
        };
        from_created.push((started - created) as f64);
        from_post.push((started - posted) as f64);
        from_post_return.push((started - returned) as f64);
        post_round_trip.push((returned - posted) as f64);
    }
    let agent_rss_after_kb = status_kb(agent_pid, "VmRSS");
    let overhead_p50 = p50(&from_created);
    println!(
        "\n== 1. runner overhead: {} sequential CI runs of one PR, a new commit each, warm agent (1 agent, 2 slots)",
        timed.len()
    );
    println!(
        "overhead, accepted -> stub dbt started   {}   target p50 < {OVERHEAD_TARGET_MS} ms: {}",
        spread(&from_created),
        verdict(overhead_p50 < OVERHEAD_TARGET_MS)
    );
    println!(
        "  from the POST sent                     {}",
        spread(&from_post)
    );
    println!(
        "  from the POST's answer                 {}",
        spread(&from_post_return)
    );
    println!(
        "  POST /api/v1/runs round trip           {}",
        spread(&post_round_trip)
    );
    println!(
        "  where the time goes (median of each step; steps after 'stub dbt started' are not overhead):"
    );
    for (index, values) in segments.iter().enumerate() {
        if values.is_empty() {
            continue;
        }
        println!(
            "    {:>7.1} ms  {} -> {}",
            p50(values),
            points[index],
            points[index + 1]
        );
    }
    Ok(Overhead {
        p50: overhead_p50,
        agent_rss_start_kb,
        agent_rss_after_kb,
    })
}
