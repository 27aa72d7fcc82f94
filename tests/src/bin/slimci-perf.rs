//! The performance run: `bench/perf`. Starts real clusters through the harness (RabbitMQ on
//! 127.0.0.1:5672, the real coordinator and agent binaries, the stub dbt) and measures what the
//! performance issue sets targets for:
//!
//! - `overhead`: a warm agent with free slots, from a run's acceptance to dbt's process start;
//! - `cancel`: a newer commit of a PR supersedes a building run; until the old dbt is gone;
//! - `log`: a line printed by dbt until a `logs?follow=true` reader (and `slimci logs -f`) has it;
//! - `throughput`: 1,000 instant builds on 4 agents, wall time per run;
//! - `webhooks`: signed `pull_request` deliveries per second, with many connections;
//! - `memory`: the agent's RSS when idle, the coordinator's holding 10,000 finished runs.
//!
//! Each prints its figures with the target and PASS or MISS; the last line is machine-readable:
//! `perf overhead_p50_ms=.. cancel_p50_ms=.. log_p50_ms=.. drain_overhead_ms_per_run=..
//! webhooks_per_s=.. agent_idle_rss_mb=.. coordinator_rss_mb_10k=..` (`na` for what did not run).
//! A MISS is a result, not a failure: the exit code is 1 only when a measurement could not be
//! made. Needs `SLIMCI_DBT` for the harness (and its Python, for the memory fill).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use slimci_tests::{Cluster, ClusterOptions, WEBHOOK_SECRET, binary, wait_for, workspace_root};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Measure {
    Overhead,
    Cancel,
    Log,
    Throughput,
    Webhooks,
    Memory,
}

#[derive(Parser)]
#[command(about = "slimci performance figures against the targets of the performance issue")]
struct Args {
    /// Only these measurements (comma-separated or repeated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Measure>,
    /// Sequential CI runs timed for the runner overhead.
    #[arg(long, default_value_t = 30)]
    overhead_runs: usize,
    /// Supersede-and-cancel repetitions.
    #[arg(long, default_value_t = 10)]
    cancel_reps: usize,
    /// More repetitions whose dbt unblocks SIGTERM itself: the cancel latency the product would
    /// have if dbt did not inherit a blocked SIGTERM from the sandbox (0: none).
    #[arg(long, default_value_t = 5)]
    cancel_whatif_reps: usize,
    /// Log lines followed for the log latency ...
    #[arg(long, default_value_t = 50)]
    log_lines: u32,
    /// ... printed this far apart.
    #[arg(long, default_value_t = 200)]
    log_interval_ms: u64,
    /// Runs queued for the throughput (at most 1000).
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    #[arg(long, default_value_t = 4)]
    agents: usize,
    #[arg(long, default_value_t = 2)]
    slots: u16,
    /// How long the throughput run may take before its figure is taken from what finished.
    #[arg(long, default_value_t = 300)]
    throughput_deadline_secs: u64,
    /// ... or how long without any build ending.
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
    /// Webhook deliveries timed.
    #[arg(long, default_value_t = 2400)]
    webhooks: usize,
    /// Concurrent webhook connections.
    #[arg(long, default_value_t = 48)]
    connections: usize,
    /// Finished runs in the coordinator's store for its memory figure.
    #[arg(long, default_value_t = 10_000)]
    stored_runs: usize,
    /// Extra environment of every agent (`KEY=VALUE`, repeatable), for experiments such as
    /// `MALLOC_ARENA_MAX=2`.
    #[arg(long, value_parser = key_value)]
    agent_env: Vec<(String, String)>,
    /// The broker URL every process uses (default the harness's), e.g. with `?frame_max=16384`.
    #[arg(long)]
    amqp_url: Option<String>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

/// `--agent-env`, for every cluster.
static AGENT_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
/// `--amqp-url`, for every cluster.
static AMQP_URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The machine's 1-minute load average: other work on it skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

// ---- targets ----

const OVERHEAD_TARGET_MS: f64 = 150.0;
const CANCEL_TARGET_MS: f64 = 1000.0;
const LOG_TARGET_MS: f64 = 300.0;
const THROUGHPUT_TARGET_MS: f64 = 20.0;
const WEBHOOKS_TARGET_PER_S: f64 = 1000.0;
const AGENT_RSS_TARGET_MB: f64 = 30.0;
const COORDINATOR_RSS_TARGET_MB: f64 = 80.0;

/// The machine-readable figures; `None` for a measurement that did not run or failed.
#[derive(Default)]
struct Figures {
    overhead_p50_ms: Option<f64>,
    cancel_p50_ms: Option<f64>,
    log_p50_ms: Option<f64>,
    drain_overhead_ms_per_run: Option<f64>,
    webhooks_per_s: Option<f64>,
    agent_idle_rss_mb: Option<f64>,
    coordinator_rss_mb_10k: Option<f64>,
}

fn figure(value: Option<f64>) -> String {
    value.map_or_else(|| "na".to_owned(), |value| format!("{value:.1}"))
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

// ---- small helpers ----

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// An RFC 3339 time of the API as Unix milliseconds.
fn ms_of(value: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(value.as_str()?)
        .ok()
        .map(|time| time.timestamp_millis())
}

/// The value at percentile `p` (0–100), nearest rank, of unsorted `values`.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// `p50 12.0 ms  p90 20.0 ms  max 31.0 ms  (n=30)`
fn spread(values: &[f64]) -> String {
    format!(
        "p50 {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms  (n={})",
        median(values),
        percentile(values, 90.0),
        percentile(values, 100.0),
        values.len()
    )
}

/// A field of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`).
fn status_kb(pid: i32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mb(kb: Option<u64>) -> f64 {
    kb.map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

/// CPU time of a process in ms: its own, and that of its waited-for children (`/proc/<pid>/stat`).
fn cpu_ms(pid: i32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14–17 of the line, 11–14 here (USER_HZ = 100).
    let tick =
        |index: usize| -> Option<f64> { Some(fields.get(index)?.parse::<f64>().ok()? * 10.0) };
    Some((tick(11)? + tick(12)?, tick(13)? + tick(14)?))
}

/// The RabbitMQ node's pid (beam.smp), for its CPU time.
fn rabbitmq_pid() -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "beam.smp")
        })
}

/// Busy CPU time of the whole machine in ms (`/proc/stat`).
fn machine_busy_ms() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|value| value.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle) * 10.0)
}

/// The stub dbt's records: (run id, event, ms).
fn stub_records(path: &Path) -> Vec<(String, String, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|entry| {
            // Run directories are `<work>/runs/<run id>-<attempt>`.
            let name = Path::new(entry["run_dir"].as_str().unwrap_or_default())
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or_default()
                .to_owned();
            let run = name
                .rsplit_once('-')
                .map_or(name.clone(), |(run, _)| run.to_owned());
            (
                run,
                entry["event"].as_str().unwrap_or_default().to_owned(),
                entry["ms"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

fn stub_event(records: &[(String, String, i64)], run: &str, event: &str) -> Option<i64> {
    records
        .iter()
        .find(|(id, name, _)| id == run && name == event)
        .map(|(_, _, ms)| *ms)
}

/// A record file that is removed at the end.
struct Record(std::path::PathBuf);

impl Record {
    fn new() -> Record {
        Record(slimci_tests::record_file())
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A cluster whose builds use the stub dbt on `tests/fixtures/stub`, its agents connected.
async fn stub_cluster(
    agents: usize,
    slots: u16,
    repository_toml: &str,
    coordinator_toml: &str,
) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start(ClusterOptions {
        agents,
        slots,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        repository_toml: repository_toml.to_owned(),
        coordinator_toml: coordinator_toml.to_owned(),
        agent_env: AGENT_ENV.get().cloned().unwrap_or_default(),
        amqp_url: AMQP_URL.get().cloned().flatten(),
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

/// Commits the stub's behaviour on main; returns the commit.
fn set_stub(cluster: &Cluster, stub: &Value) -> anyhow::Result<String> {
    cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub.to_string())
}

/// A new commit for PR `pr` (a commit on main with this stub behaviour, `refs/pull/<pr>/head`
/// pointed at it).
fn pr_commit(cluster: &Cluster, pr: u64, stub: &Value) -> anyhow::Result<String> {
    let sha = set_stub(cluster, stub)?;
    cluster.origin.point_pull_request(pr, &sha)?;
    Ok(sha)
}

/// Deploys main with an instant stub build, for the production state CI runs need.
async fn deploy(cluster: &mut Cluster, record: Option<&Record>) -> anyhow::Result<()> {
    let mut stub = json!({ "duration_ms": 0, "nodes": 3, "log_lines": 5 });
    if let Some(record) = record {
        stub["record"] = json!(record.0);
    }
    set_stub(cluster, &stub)?;
    cluster.deploy().await.context("the deploy")?;
    Ok(())
}

async fn submit_ci(cluster: &Cluster, pr: u64, sha: &str) -> anyhow::Result<Value> {
    let (status, run) = cluster
        .post_run(json!({ "repository": "shop", "pr": pr, "sha": sha }))
        .await?;
    ensure!(status == 201, "CI run of PR {pr}: HTTP {status}: {run}");
    Ok(run)
}

fn id_of(run: &Value) -> String {
    run["id"].as_str().unwrap_or_default().to_owned()
}

/// The started and finished ms of a phase of attempt 1.
fn phase(run: &Value, name: &str) -> (Option<i64>, Option<i64>) {
    run["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|phase| phase["phase"] == name && phase["attempt"] == 1)
        .map_or((None, None), |phase| {
            (ms_of(&phase["started_at"]), ms_of(&phase["finished_at"]))
        })
}

async fn get_json(cluster: &Cluster, path: &str) -> anyhow::Result<Value> {
    let response = cluster
        .http
        .get(format!("{}{path}", cluster.url))
        .send()
        .await?;
    ensure!(
        response.status().is_success(),
        "GET {path}: HTTP {}",
        response.status()
    );
    Ok(response.json().await?)
}

/// The tail of every process's log, when a wait failed.
fn print_logs(cluster: &Cluster) {
    eprintln!(
        "coordinator log:\n{}",
        slimci_tests::tail(&cluster.coordinator.log)
    );
    for agent in &cluster.agents {
        eprintln!("{} log:\n{}", agent.name, slimci_tests::tail(&agent.log));
    }
}

// ---- 1. runner overhead ----

struct Overhead {
    p50: f64,
    agent_rss_start_kb: Option<u64>,
    agent_rss_after_kb: Option<u64>,
}

async fn overhead(args: &Args) -> anyhow::Result<Overhead> {
    let mut cluster = stub_cluster(1, 2, "", "").await?;
    let agent_pid = cluster.agents[0].pid();
    let agent_rss_start_kb = status_kb(agent_pid, "VmRSS");
    let record = Record::new();
    deploy(&mut cluster, Some(&record)).await?;
    let stub = |seq: usize| json!({ "duration_ms": 0, "nodes": 3, "log_lines": 5, "record": record.0, "seq": seq });
    // Warm: the git cache holds the repository and the production manifest is cached.
    let sha = pr_commit(&cluster, 1, &stub(0))?;
    let warm = id_of(&submit_ci(&cluster, 1, &sha).await?);
    let warm = cluster.wait_for_run(&warm, Duration::from_secs(60)).await?;
    ensure!(warm["status"] == "success", "warm-up run: {warm}");

    let mut timed = Vec::new();
    for seq in 1..=args.overhead_runs {
        let sha = pr_commit(&cluster, 1, &stub(seq))?;
        let posted = now_ms();
        let run = submit_ci(&cluster, 1, &sha).await?;
        let returned = now_ms();
        let id = id_of(&run);
        let run = cluster.wait_for_run(&id, Duration::from_secs(60)).await?;
        ensure!(run["status"] == "success", "run {seq}: {run}");
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
            ms_of(&run["created_at"]),
            ms_of(&run["started_at"]),
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
            ms_of(&run["finished_at"]),
        ];
        for (index, pair) in at.windows(2).enumerate() {
            if let [Some(from), Some(to)] = pair {
                segments[index].push((to - from) as f64);
            }
        }
        let (Some(created), Some(started)) = (at[0], at[9]) else {
            bail!("run {id} lacks its created_at or the stub's start record: {run}");
        };
        from_created.push((started - created) as f64);
        from_post.push((started - posted) as f64);
        from_post_return.push((started - returned) as f64);
        post_round_trip.push((returned - posted) as f64);
    }
    let agent_rss_after_kb = status_kb(agent_pid, "VmRSS");
    let p50 = median(&from_created);
    println!(
        "\n== 1. runner overhead: {} sequential CI runs of one PR, a new commit each, warm agent (1 agent, 2 slots)",
        timed.len()
    );
    println!(
        "overhead, accepted -> stub dbt started   {}   target p50 < {OVERHEAD_TARGET_MS} ms: {}",
        spread(&from_created),
        verdict(p50 < OVERHEAD_TARGET_MS)
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
            median(values),
            points[index],
            points[index + 1]
        );
    }
    Ok(Overhead {
        p50,
        agent_rss_start_kb,
        agent_rss_after_kb,
    })
}

// ---- 2. cancel latency ----

/// The host pid of the stub dbt building `run` (its working directory is in the run's
/// directory; the pid in its records is the one inside the build's PID namespace).
fn stub_pid(run: &str) -> Option<i32> {
    let marker = format!("/runs/{run}-");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("slimci-stub-dbt"))
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.to_string_lossy().contains(&marker))
        })
}

/// The blocked-signal mask of a process's main thread (`SigBlk`).
fn blocked_signals(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hex = text.lines().find_map(|line| line.strip_prefix("SigBlk:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Polls every millisecond until `pid` is gone (or a zombie); returns when, or none by `until`.
fn wait_gone(pid: i32, until: Instant) -> Option<i64> {
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let after = stat.rfind(')')?;
                stat[after + 1..]
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            });
        if state
            .as_deref()
            .is_none_or(|state| state == "Z" || state == "X")
        {
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
    ms_of(&json!(plain.split_whitespace().next()?))
}

#[derive(Default)]
struct CancelFigures {
    gone: Vec<f64>,
    to_agent: Vec<f64>,
    superseded: Vec<f64>,
    next_started: Vec<f64>,
    handled_sigterm: usize,
    sigterm_blocked: usize,
}

impl CancelFigures {
    fn print(&self, headline: &str, target: bool) {
        let p50 = median(&self.gone);
        if target {
            println!(
                "{headline}{}   target < {CANCEL_TARGET_MS} ms: {}",
                spread(&self.gone),
                verdict(p50 < CANCEL_TARGET_MS)
            );
        } else {
            println!("{headline}{}", spread(&self.gone));
        }
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
        println!(
            "  dbt saw SIGTERM (the stub's `end` record) in {} of {}; SIGTERM was in dbt's blocked signal mask in {} of {}",
            self.handled_sigterm,
            self.gone.len(),
            self.sigterm_blocked,
            self.gone.len()
        );
    }
}

async fn cancel(args: &Args) -> anyhow::Result<f64> {
    let mut cluster = stub_cluster(1, 2, "", "").await?;
    let record = Record::new();
    deploy(&mut cluster, None).await?;
    // Commits 0..reps behave like dbt; later ones unblock SIGTERM themselves (the what-if).
    let reps = args.cancel_reps;
    let long = |seq: usize| {
        json!({
            "duration_ms": 600_000, "nodes": 3, "log_lines": 5, "record": record.0, "seq": seq,
            "unblock_signals": seq >= reps,
        })
    };
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
    let mut building = id_of(&submit_ci(&cluster, pr, &sha).await?);
    wait_started(building.clone()).await?;
    let mut measured = CancelFigures::default();
    let mut whatif = CancelFigures::default();
    for seq in 1..=reps + args.cancel_whatif_reps {
        // The old build is commit seq - 1.
        let figures = if seq <= reps {
            &mut measured
        } else {
            &mut whatif
        };
        // Let the build settle into its run, as a real superseded build would have.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let old = building.clone();
        let pid = wait_for(
            &format!("run {old}'s stub process"),
            Duration::from_secs(10),
            || {
                let found = stub_pid(&old);
                async move { Ok(found) }
            },
        )
        .await?;
        // SIGTERM is signal 15: bit 14.
        if blocked_signals(pid).is_some_and(|mask| mask & (1 << 14) != 0) {
            figures.sigterm_blocked += 1;
        }
        let sha = pr_commit(&cluster, pr, &long(seq))?;
        let watcher = tokio::task::spawn_blocking(move || {
            wait_gone(pid, Instant::now() + Duration::from_secs(60))
        });
        let submitted = now_ms();
        let newer = id_of(&submit_ci(&cluster, pr, &sha).await?);
        let Some(ended) = watcher.await? else {
            print_logs(&cluster);
            bail!("run {old}'s stub (pid {pid}) outlived its cancel by 60 s");
        };
        figures.gone.push((ended - submitted) as f64);
        if stub_event(&stub_records(&record.0), &old, "end").is_some() {
            figures.handled_sigterm += 1;
        }
        let old_run = cluster.wait_for_run(&old, Duration::from_secs(30)).await?;
        ensure!(
            old_run["status"] == "superseded",
            "the old run ended {}",
            old_run["status"]
        );
        if let Some(finished) = ms_of(&old_run["finished_at"]) {
            figures.superseded.push((finished - submitted) as f64);
        }
        if let Some(cancelling) = agent_cancelling_ms(&cluster.agents[0].log, &old) {
            figures.to_agent.push((cancelling - submitted) as f64);
        }
        let started = wait_started(newer.clone()).await?;
        figures.next_started.push((started - submitted) as f64);
        building = newer;
    }
    let _ = cluster
        .http
        .post(format!("{}/api/v1/runs/{building}/cancel", cluster.url))
        .send()
        .await;
    println!(
        "\n== 2. cancel latency: {} newer commits superseding a building run (the stub exits at once on SIGTERM; sandbox.grace_secs = 5 in the harness, 10 by default)",
        measured.gone.len()
    );
    measured.print("newer commit POSTed -> old dbt gone      ", true);
    if !whatif.gone.is_empty() {
        println!(
            "  what-if, {} more whose dbt unblocks SIGTERM itself (not a product figure):",
            whatif.gone.len()
        );
        whatif.print("  POSTed -> old dbt gone                 ", false);
    }
    Ok(median(&measured.gone))
}

// ---- 3. log latency ----

/// `at_ms=<n>` in a line.
fn stamped_ms(line: &str) -> Option<i64> {
    let rest = &line[line.find("at_ms=")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Follows the SSE log of a run; for each stamped line, when it arrived minus its stamp.
async fn follow_sse(
    http: reqwest::Client,
    url: String,
    deadline: Duration,
) -> anyhow::Result<Vec<f64>> {
    let until = Instant::now() + deadline;
    let mut response = http.get(url).send().await?;
    ensure!(
        response.status().is_success(),
        "follow: HTTP {}",
        response.status()
    );
    let mut buffer = String::new();
    let mut latencies = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let Some(chunk) = tokio::time::timeout(left, response.chunk())
            .await
            .context("following the log: deadline")??
        else {
            break;
        };
        let arrived = now_ms();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let mut kind = "message";
            let mut data = String::new();
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    kind = if value.trim() == "log" {
                        "log"
                    } else if value.trim() == "end" {
                        "end"
                    } else {
                        "other"
                    };
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            match kind {
                "log" => {
                    if let Some(stamp) = stamped_ms(&data) {
                        latencies.push((arrived - stamp) as f64);
                    }
                }
                "end" => return Ok(latencies),
                _ => {}
            }
        }
    }
    Ok(latencies)
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

async fn log_latency(args: &Args) -> anyhow::Result<f64> {
    let mut cluster = stub_cluster(1, 2, "", "").await?;
    deploy(&mut cluster, None).await?;
    let stub = json!({
        "duration_ms": 0, "nodes": 3, "log_lines": args.log_lines,
        "line_interval_ms": args.log_interval_ms,
    });
    let sha = pr_commit(&cluster, 3, &stub)?;
    let id = id_of(&submit_ci(&cluster, 3, &sha).await?);
    let deadline = Duration::from_millis(args.log_interval_ms * u64::from(args.log_lines))
        + Duration::from_secs(60);
    let sse = tokio::spawn(follow_sse(
        cluster.http.clone(),
        format!("{}/api/v1/runs/{id}/logs?follow=true", cluster.url),
        deadline,
    ));
    let mut command = cluster.cli();
    command.args(["logs", &id, "--follow"]);
    let cli = tokio::task::spawn_blocking(move || follow_cli(command, deadline));
    let sse = sse.await??;
    let cli = cli.await??;
    let run = cluster.wait_for_run(&id, Duration::from_secs(60)).await?;
    ensure!(run["status"] == "success", "the log run: {run}");
    ensure!(
        sse.len() == args.log_lines as usize,
        "saw {} of {} stamped lines over SSE",
        sse.len(),
        args.log_lines
    );
    let p50 = median(&sse);
    println!(
        "\n== 3. log latency: {} lines {} ms apart, dbt's print -> seen by a follower",
        args.log_lines, args.log_interval_ms
    );
    println!(
        "GET logs?follow=true (SSE, reqwest)      {}   target < {LOG_TARGET_MS} ms: {}",
        spread(&sse),
        verdict(p50 < LOG_TARGET_MS && percentile(&sse, 90.0) < LOG_TARGET_MS)
    );
    println!("  slimci logs --follow (stdout)          {}", spread(&cli));
    Ok(p50)
}

// ---- 4. throughput ----

struct Throughput {
    per_run_ms: f64,
}

/// Ready and unacknowledged messages of one of the cluster's queues, from `rabbitmqctl` (the
/// AMQP passive declare counts ready messages only). None if it cannot tell.
fn queue_counts(queue: &str) -> Option<(u64, u64)> {
    let output = Command::new("timeout")
        .args([
            "30",
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [name, ready, unacked] if *name == queue => {
                    Some((ready.parse().ok()?, unacked.parse().ok()?))
                }
                _ => None,
            }
        })
}

async fn throughput(args: &Args) -> anyhow::Result<Throughput> {
    ensure!(
        (1..=1000).contains(&args.runs),
        "--runs must be 1..=1000 (the run list answers at most 1000)"
    );
    let mut cluster = stub_cluster(args.agents, args.slots, "", "").await?;
    let record = Record::new();
    // Instant builds; each records its end, which tells progress without asking the coordinator.
    deploy(&mut cluster, Some(&record)).await?;
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
    let ends = |path: &Path| {
        stub_records(path)
            .iter()
            .filter(|(_, event, _)| event == "end")
            .count()
    };
    let deploy_ends = ends(&record.0);

    let rabbit = rabbitmq_pid();
    let pids: Vec<i32> = std::iter::once(cluster.coordinator.pid())
        .chain(cluster.agents.iter().map(|agent| agent.pid()))
        .collect();
    let cpu_before: Vec<Option<(f64, f64)>> = pids.iter().map(|pid| cpu_ms(*pid)).collect();
    let rabbit_before = rabbit.and_then(cpu_ms);
    let machine_before = machine_busy_ms();

    let first_submit = now_ms();
    let started = Instant::now();
    for pr in 1..=args.runs as u64 {
        submit_ci(&cluster, pr, &sha).await?;
    }
    let submitted_s = started.elapsed().as_secs_f64();
    // Until every run ended; or no build ended for `stall_secs`; or the deadline.
    let deadline = started + Duration::from_secs(args.throughput_deadline_secs);
    let stall = Duration::from_secs(args.stall_secs);
    let mut builds_ended = 0;
    let mut last_progress = Instant::now();
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now_ended = ends(&record.0) - deploy_ends;
        if now_ended != builds_ended {
            builds_ended = now_ended;
            last_progress = Instant::now();
        }
        let queued = get_json(&cluster, "/api/v1/runs?status=queued&limit=1").await?;
        let running = get_json(&cluster, "/api/v1/runs?status=running&limit=1").await?;
        if queued.as_array().is_some_and(Vec::is_empty)
            && running.as_array().is_some_and(Vec::is_empty)
        {
            break "all ended";
        }
        if Instant::now() > deadline {
            break "deadline";
        }
        if last_progress.elapsed() > stall {
            break "stalled";
        }
    };
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let cpu_after: Vec<Option<(f64, f64)>> = pids.iter().map(|pid| cpu_ms(*pid)).collect();
    let rabbit_after = rabbit.and_then(cpu_ms);
    let machine_after = machine_busy_ms();

    let runs: Vec<Value> = get_json(&cluster, "/api/v1/runs?limit=1000")
        .await?
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|run| run["kind"] == "ci")
        .collect();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for run in &runs {
        *by_status
            .entry(run["status"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let done: Vec<&Value> = runs
        .iter()
        .filter(|run| !matches!(run["status"].as_str(), Some("queued" | "running")))
        .collect();
    let succeeded = by_status.get("success").copied().unwrap_or_default();
    let last_finished = done
        .iter()
        .filter_map(|run| ms_of(&run["finished_at"]))
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
        if let Some((ready, unacked)) = queue_counts(&format!("{}.jobs", cluster.prefix)) {
            println!(
                "  the jobs queue holds {ready} ready and {unacked} unacknowledged messages: jobs delivered to an agent and never taken"
            );
        }
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
    let locked = std::fs::read_to_string(&cluster.coordinator.log)
        .unwrap_or_default()
        .matches("database is locked")
        .count();
    println!(
        "  coordinator log: {locked} \"database is locked\" retries of an agent event (each holds up every event behind it 200 ms or more)"
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
    Ok(Throughput { per_run_ms })
}

// ---- 5. webhook intake ----

/// One signed delivery: (delivery id, event, body, signature).
type Delivery = (String, &'static str, Vec<u8>, String);

/// `count` `pull_request` deliveries round-robin over PRs `first_pr..first_pr + prs`: each PR
/// `opened`, then `synchronize` with a new head SHA each time (which supersedes its last run).
fn pull_request_deliveries(repo: &str, count: usize, prs: usize, first_pr: usize) -> Vec<Delivery> {
    (0..count)
        .map(|index| {
            let pr = (index % prs + first_pr) as u64;
            let round = index / prs;
            let action = if round == 0 { "opened" } else { "synchronize" };
            let sha = format!("{:020x}{:020x}", pr, round + 1);
            let payload = slimci_tests::github::pull_request_payload(repo, action, pr, &sha, false);
            let body = serde_json::to_vec(&payload).expect("JSON");
            let signature = slimci_tests::github::sign(WEBHOOK_SECRET, &body);
            (
                uuid::Uuid::new_v4().to_string(),
                "pull_request",
                body,
                signature,
            )
        })
        .collect()
}

/// Sends `deliveries` over `connections` concurrent connections; returns (HTTP status or 0,
/// latency ms) of each, and the wall time in seconds.
async fn send_deliveries(
    client: &reqwest::Client,
    url: &str,
    deliveries: Vec<Delivery>,
    connections: usize,
) -> (Vec<(u16, f64)>, f64) {
    let deliveries = Arc::new(deliveries);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, url, deliveries, next) = (
            client.clone(),
            url.to_owned(),
            deliveries.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, event, body, signature)) = deliveries.get(index) else {
                    return results;
                };
                let sent = Instant::now();
                let status = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-github-event", *event)
                    .header("x-github-delivery", id)
                    .header("x-hub-signature-256", signature)
                    .header("user-agent", "GitHub-Hookshot/perf")
                    .body(body.clone())
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await
                    .map(|response| response.status().as_u16())
                    .unwrap_or(0);
                results.push((status, sent.elapsed().as_secs_f64() * 1000.0));
            }
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await.expect("sender task"));
    }
    (results, started.elapsed().as_secs_f64())
}

/// Prints one pass; returns its rate of accepted deliveries.
fn report_deliveries(what: &str, results: &[(u16, f64)], wall: f64, target: bool) -> f64 {
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for (status, _) in results {
        *by_status.entry(*status).or_default() += 1;
    }
    let accepted = results
        .iter()
        .filter(|(status, _)| (200..300).contains(status))
        .count();
    let latencies: Vec<f64> = results.iter().map(|(_, ms)| *ms).collect();
    let rate = accepted as f64 / wall;
    let verdict_text = if target {
        format!(
            "   target >= {WEBHOOKS_TARGET_PER_S}/s: {}",
            verdict(rate >= WEBHOOKS_TARGET_PER_S && accepted == results.len())
        )
    } else {
        String::new()
    };
    println!(
        "{what}: {accepted} of {} accepted (2xx) in {wall:.2} s: {rate:.0} deliveries/s{verdict_text}",
        results.len()
    );
    println!(
        "  latency p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms; {}",
        median(&latencies),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 100.0),
        by_status
            .iter()
            .map(|(status, count)| format!("HTTP {status} x{count}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    rate
}

async fn webhooks(args: &Args) -> anyhow::Result<f64> {
    const REPO: &str = "acme/shop";
    let mut cluster = stub_cluster(
        1,
        1,
        &format!("github = \"{REPO}\""),
        &format!("[github]\nwebhook_secret = \"{WEBHOOK_SECRET}\"\n"),
    )
    .await?;
    deploy(&mut cluster, None).await?;
    // No agent: the runs the deliveries make just queue (and go out to the jobs queue).
    cluster.kill_agent(0);
    let many_prs = (args.webhooks / 8).max(1);
    let few_prs = 12;
    // Signed up front, so the sender spends its CPU on sending.
    let pings: Vec<Delivery> = (0..200)
        .map(|_| {
            let body = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#.to_vec();
            let signature = slimci_tests::github::sign(WEBHOOK_SECRET, &body);
            (uuid::Uuid::new_v4().to_string(), "ping", body, signature)
        })
        .collect();
    let few = pull_request_deliveries(REPO, args.webhooks / 2, few_prs, 10_000);
    let many = pull_request_deliveries(REPO, args.webhooks, many_prs, 1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let url = format!("{}/webhooks/github", cluster.url);
    println!(
        "\n== 5. webhook intake: signed deliveries over {} connections, no agent (runs queue); {} CPUs shared with the sender",
        args.connections,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // Warms the connections (and shows the cost of a delivery that changes no run).
    let (results, wall) = send_deliveries(&client, &url, pings, args.connections).await;
    report_deliveries("200 `ping` deliveries (warm-up)", &results, wall, false);
    let (results, wall) = send_deliveries(&client, &url, few, args.connections).await;
    report_deliveries(
        &format!(
            "{} pull_request on {few_prs} PRs (few runs waiting)",
            args.webhooks / 2
        ),
        &results,
        wall,
        false,
    );
    let (results, wall) = send_deliveries(&client, &url, many, args.connections).await;
    let rate = report_deliveries(
        &format!(
            "{} pull_request on {many_prs} PRs (opened, then synchronize with new SHAs)",
            args.webhooks
        ),
        &results,
        wall,
        true,
    );
    let queued = get_json(&cluster, "/api/v1/runs?status=queued&limit=1000")
        .await?
        .as_array()
        .map_or(0, Vec::len);
    println!("  runs queued at the end: {queued}");
    Ok(rate)
}

// ---- 6. memory ----

/// Fills the stopped coordinator's store up to `target` runs by copying its finished CI runs
/// (row, phases, nodes, artifacts, log files) under new ids, older PR numbers and earlier times.
const FILL_SCRIPT: &str = r#"
import os, random, shutil, sqlite3, sys, uuid
db, logs, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db)
cols = [row[1] for row in con.execute("PRAGMA table_info(runs)") if row[1] != "id"]
templates = [row[0] for row in con.execute("SELECT id FROM runs WHERE kind = 'ci' AND status = 'success'")]
if not templates:
    sys.exit("no finished CI run to copy")
count = con.execute("SELECT count(*) FROM runs").fetchone()[0]
oldest = con.execute("SELECT min(created_ms) FROM runs").fetchone()[0]
def uuid7(ms):
    bits = random.getrandbits(74)
    value = (ms << 80) | (0x7 << 76) | ((bits >> 62) << 64) | (0b10 << 62) | (bits & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))
children = {}
for table in ("run_phases", "run_nodes", "artifacts"):
    children[table] = [row[1] for row in con.execute(f"PRAGMA table_info({table})") if row[1] != "run_id"]
column_list = ", ".join(cols)
made = 0
for index in range(max(0, target - count)):
    old = templates[index % len(templates)]
    shift = (index + 1) * 10_000
    new = uuid7(oldest - shift)
    pr = 10_000 + index // 5
    con.execute(f"INSERT INTO runs (id, {column_list}) SELECT ?, {column_list} FROM runs WHERE id = ?", (new, old))
    con.execute(
        "UPDATE runs SET created_ms = created_ms - ?1, started_ms = started_ms - ?1, finished_ms = finished_ms - ?1,"
        " pr_number = ?2, isolation = 'pr_shop_' || ?2 WHERE id = ?3", (shift, pr, new))
    for table, columns in children.items():
        listed = ", ".join(columns)
        con.execute(f"INSERT INTO {table} (run_id, {listed}) SELECT ?, {listed} FROM {table} WHERE run_id = ?", (new, old))
    source = os.path.join(logs, old)
    if os.path.isdir(source):
        shutil.copytree(source, os.path.join(logs, new))
    made += 1
con.commit()
con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
print(made, con.execute("SELECT count(*) FROM runs").fetchone()[0])
"#;

struct Memory {
    agent_idle_kb: Option<u64>,
    coordinator_kb: Option<u64>,
}

async fn memory(args: &Args) -> anyhow::Result<Memory> {
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
        ids.push(id_of(&submit_ci(&cluster, pr, &sha).await?));
    }
    for id in &ids {
        let run = cluster.wait_for_run(id, Duration::from_secs(60)).await?;
        ensure!(run["status"] == "success", "run {id}: {run}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_after = status_kb(agent_pid, "VmRSS");
    let agent_after_hwm = status_kb(agent_pid, "VmHWM");
    let agent_parts = format!(
        "{:.1} MB anonymous + {:.1} MB file-backed (its binary and libraries), {} threads",
        mb(status_kb(agent_pid, "RssAnon")),
        mb(status_kb(agent_pid, "RssFile")),
        std::fs::read_to_string(format!("/proc/{agent_pid}/status"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("Threads:"))
                    .map(|count| count.trim().to_owned())
            })
            .unwrap_or_default()
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
    get_json(&cluster, "/api/v1/runs").await?;
    let mut listed = Vec::new();
    for _ in 0..3 {
        listed = get_json(&cluster, "/api/v1/runs?limit=1000")
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default();
    }
    get_json(&cluster, "/api/v1/runs?status=success&limit=1000").await?;
    get_json(&cluster, "/api/v1/repositories").await?;
    for run in listed.iter().step_by(100) {
        let id = id_of(run);
        cluster.run(&id).await?;
        cluster.log(&id).await?;
    }
    let total = listed.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let coordinator_kb = status_kb(pid, "VmRSS");
    let coordinator_hwm = status_kb(pid, "VmHWM");
    let coordinator_parts = format!(
        "{:.1} MB anonymous + {:.1} MB file-backed",
        mb(status_kb(pid, "RssAnon")),
        mb(status_kb(pid, "RssFile"))
    );
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    AGENT_ENV.get_or_init(|| args.agent_env.clone());
    AMQP_URL.get_or_init(|| args.amqp_url.clone());
    let chosen = |measure: Measure| args.only.is_empty() || args.only.contains(&measure);
    let mut figures = Figures::default();
    let mut failed: Vec<(&str, String)> = Vec::new();
    let started = Instant::now();
    if chosen(Measure::Overhead) {
        println!(
            "[overhead] starting; machine load average {} (1 min)",
            load_average()
        );
        match overhead(&args).await {
            Ok(result) => {
                figures.overhead_p50_ms = Some(result.p50);
                println!(
                    "  agent RSS: {:.1} MB after start-up, {:.1} MB after {} runs",
                    mb(result.agent_rss_start_kb),
                    mb(result.agent_rss_after_kb),
                    args.overhead_runs + 2
                );
            }
            Err(error) => {
                failed.push(("overhead", format!("{error:#}")));
            }
        }
    }
    if chosen(Measure::Cancel) {
        println!(
            "[cancel] starting; machine load average {} (1 min)",
            load_average()
        );
        match cancel(&args).await {
            Ok(p50) => figures.cancel_p50_ms = Some(p50),
            Err(error) => {
                failed.push(("cancel", format!("{error:#}")));
            }
        }
    }
    if chosen(Measure::Log) {
        println!(
            "[log] starting; machine load average {} (1 min)",
            load_average()
        );
        match log_latency(&args).await {
            Ok(p50) => figures.log_p50_ms = Some(p50),
            Err(error) => {
                failed.push(("log", format!("{error:#}")));
            }
        }
    }
    if chosen(Measure::Throughput) {
        println!(
            "[throughput] starting; machine load average {} (1 min)",
            load_average()
        );
        match throughput(&args).await {
            Ok(result) => figures.drain_overhead_ms_per_run = Some(result.per_run_ms),
            Err(error) => {
                failed.push(("throughput", format!("{error:#}")));
            }
        }
    }
    if chosen(Measure::Webhooks) {
        println!(
            "[webhooks] starting; machine load average {} (1 min)",
            load_average()
        );
        match webhooks(&args).await {
            Ok(rate) => figures.webhooks_per_s = Some(rate),
            Err(error) => {
                failed.push(("webhooks", format!("{error:#}")));
            }
        }
    }
    if chosen(Measure::Memory) {
        println!(
            "[memory] starting; machine load average {} (1 min)",
            load_average()
        );
        match memory(&args).await {
            Ok(result) => {
                figures.agent_idle_rss_mb = result.agent_idle_kb.map(|kb| kb as f64 / 1024.0);
                figures.coordinator_rss_mb_10k = result.coordinator_kb.map(|kb| kb as f64 / 1024.0);
            }
            Err(error) => {
                failed.push(("memory", format!("{error:#}")));
            }
        }
    }
    println!();
    for (name, error) in &failed {
        println!("FAILED {name}: {error}");
    }
    println!(
        "total time {:.0} s; machine load average {} (1 min) at the end",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    println!(
        "perf overhead_p50_ms={} cancel_p50_ms={} log_p50_ms={} drain_overhead_ms_per_run={} webhooks_per_s={} agent_idle_rss_mb={} coordinator_rss_mb_10k={}",
        figure(figures.overhead_p50_ms),
        figure(figures.cancel_p50_ms),
        figure(figures.log_p50_ms),
        figure(figures.drain_overhead_ms_per_run),
        figure(figures.webhooks_per_s),
        figure(figures.agent_idle_rss_mb),
        figure(figures.coordinator_rss_mb_10k),
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
