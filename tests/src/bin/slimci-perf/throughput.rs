//! Throughput (measurement 4): many instant stub builds, one PR each, queued at once on several
//! agents; the wall time per run from the first submit to the last run finished, with the CPU each
//! process spent per run.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::ensure;
use slimci_client::{RunStatus, RunView};
use slimci_proto::RunKind;
use slimci_tests::ci_request;
use slimci_tests::measure::{
    cpu_ms, machine_busy_ms, mb, ms_of, now_ms, pid_of_command, status_kb,
};

use crate::Args;
use crate::cluster::{deploy, stub_cluster};
use crate::report::verdict;

const THROUGHPUT_TARGET_MS: f64 = 20.0;

/// Runs the throughput measurement; its figure, the wall time per run in ms.
pub async fn throughput(args: &Args) -> anyhow::Result<f64> {
    ensure!(
        (1..=1000).contains(&args.runs),
        "--runs must be 1..=1000 (the run list answers at most 1000)"
    );
    let mut cluster = stub_cluster(args.agents, args.slots, "", "").await?;
    // Instant builds.
    deploy(&mut cluster, None).await?;
    let sha = cluster.origin.main_sha()?;
    // One PR per run, all at the deployed commit (cached after each agent's first fetch).
    let mut update = Command::new("git")
        .args(["update-ref", "--stdin"])
        .current_dir(&cluster.origin.path)
        .stdin(Stdio::piped())
        .spawn()?;
    {
        let mut stdin = update.stdin.take().expect("piped");
        for pr in 1..=args.runs {
            writeln!(stdin, "update refs/pull/{pr}/head {sha}")?;
        }
    }
    ensure!(update.wait()?.success(), "git update-ref failed");

    let rabbit = pid_of_command("beam.smp");
    let pids: Vec<i32> = std::iter::once(cluster.coordinator.pid())
        .chain(cluster.agents.iter().map(|agent| agent.pid()))
        .collect();
    let cpu_before: Vec<Option<(f64, f64)>> = pids.iter().map(|pid| cpu_ms(*pid)).collect();
    let rabbit_before = rabbit.and_then(cpu_ms);
    let machine_before = machine_busy_ms();

    let first_submit = now_ms();
    let started = Instant::now();
    for pr in 1..=args.runs as u64 {
        cluster.create_run(&ci_request(pr, &sha)).await?;
    }
    let submitted_s = started.elapsed().as_secs_f64();
    // Until every run ended, or the deadline.
    let deadline = started + Duration::from_secs(args.throughput_deadline_secs);
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let queued = cluster.runs_where(Some(RunStatus::Queued), 1).await?;
        let running = cluster.runs_where(Some(RunStatus::Running), 1).await?;
        if queued.is_empty() && running.is_empty() {
            break "all ended";
        }
        if Instant::now() > deadline {
            break "deadline";
        }
    };
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let cpu_after: Vec<Option<(f64, f64)>> = pids.iter().map(|pid| cpu_ms(*pid)).collect();
    let rabbit_after = rabbit.and_then(cpu_ms);
    let machine_after = machine_busy_ms();

    let runs: Vec<RunView> = cluster
        .runs()
        .await?
        .into_iter()
        .filter(|run| run.kind == RunKind::Ci)
        .collect();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for run in &runs {
        *by_status.entry(run.status.as_str().to_owned()).or_default() += 1;
    }
    let done: Vec<&RunView> = runs.iter().filter(|run| run.status.is_terminal()).collect();
    let succeeded = by_status.get("success").copied().unwrap_or_default();
    let last_finished = done
        .iter()
        .filter_map(|run| run.finished_at.as_deref().and_then(ms_of))
        .max()
        .unwrap_or(first_submit);
    let all_ended = outcome == "all ended";
    let ended_wall_ms = (last_finished - first_submit) as f64;
    // Until every run ended; if some never did, the time we gave up: a lower bound.
    let wall_ms = if all_ended { ended_wall_ms } else { elapsed_ms };
    let per_run_ms = wall_ms / args.runs as f64;
    println!(
        "\n== 4. throughput: {} instant stub builds on {} agents x {} slots (1 coordinator), one PR each",
        args.runs, args.agents, args.slots
    );
    println!(
        "runs {}  ended {}  succeeded {}  ({})",
        args.runs,
        done.len(),
        succeeded,
        by_status
            .iter()
            .map(|(status, count)| format!("{status} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "wall, first submit -> last finished      {}; submitting took {:.1} s ({:.1} ms per POST)",
        if all_ended {
            format!(
                "{:.1} s ({:.1} runs/s)",
                wall_ms / 1000.0,
                args.runs as f64 / (wall_ms / 1000.0)
            )
        } else {
            format!(
                "never: {} runs had not ended when we gave up ({outcome}) after {:.1} s",
                args.runs - done.len(),
                elapsed_ms / 1000.0
            )
        },
        submitted_s,
        submitted_s * 1000.0 / args.runs as f64
    );
    println!(
        "overhead per run                         {}{per_run_ms:.1} ms   target <= {THROUGHPUT_TARGET_MS} ms: {}{}",
        if all_ended { "" } else { ">= " },
        verdict(all_ended && per_run_ms <= THROUGHPUT_TARGET_MS && succeeded == args.runs),
        if succeeded == args.runs {
            "  (all succeeded)"
        } else {
            "  (NOT all succeeded)"
        }
    );
    if !all_ended {
        println!(
            "  the {} runs that ended: last one {:.1} s after the first submit, {:.1} ms per run",
            done.len(),
            ended_wall_ms / 1000.0,
            ended_wall_ms / done.len().max(1) as f64
        );
    }
    let runs_done = done.len().max(1) as f64;
    let mut cpu_lines = Vec::new();
    let mut agents_total = (0.0, 0.0);
    for (index, (before, after)) in cpu_before.iter().zip(&cpu_after).enumerate() {
        if let (Some(before), Some(after)) = (before, after) {
            let own = after.0 - before.0;
            let children = after.1 - before.1;
            if index == 0 {
                cpu_lines.push(format!("coordinator {:.1}", own / runs_done));
            } else {
                agents_total.0 += own;
                agents_total.1 += children;
            }
        }
    }
    cpu_lines.push(format!(
        "agents {:.1} + their sandbox and stub children {:.1}",
        agents_total.0 / runs_done,
        agents_total.1 / runs_done
    ));
    if let (Some(before), Some(after)) = (rabbit_before, rabbit_after) {
        cpu_lines.push(format!("RabbitMQ {:.1}", (after.0 - before.0) / runs_done));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let (Some(before), Some(after)) = (machine_before, machine_after) {
        cpu_lines.push(format!(
            "whole machine, anything else running included, {:.1} of {:.1} on {cpus} CPUs",
            (after - before) / runs_done,
            elapsed_ms * cpus as f64 / runs_done,
        ));
    }
    println!(
        "  CPU ms per ended run, over the whole wait: {}",
        cpu_lines.join("; ")
    );
    let agent_rss: Vec<String> = cluster
        .agents
        .iter()
        .map(|agent| format!("{:.1}", mb(status_kb(agent.pid(), "VmRSS"))))
        .collect();
    println!(
        "  RSS after: coordinator {:.1} MB (peak {:.1}), agents {} MB",
        mb(status_kb(cluster.coordinator.pid(), "VmRSS")),
        mb(status_kb(cluster.coordinator.pid(), "VmHWM")),
        agent_rss.join(" / ")
    );
    Ok(per_run_ms)
}
