//! The performance run: `bench/perf`. Starts real clusters through the harness (RabbitMQ on
//! 127.0.0.1:5672, the real coordinator and agent binaries, the stub dbt) and measures what the
//! performance issue sets targets for, one module each:
//!
//! - `overhead`: a warm agent with free slots, from a run's acceptance to dbt's process start;
//! - `cancel`: a newer commit of a PR supersedes a building run; until the old dbt is gone;
//! - `log_latency`: a line printed by dbt until a `logs?follow=true` reader (and
//!   `slimci logs -f`) has it;
//! - `throughput`: 1,000 instant builds on 4 agents, wall time per run;
//! - `webhooks`: signed `pull_request` deliveries per second, with many connections;
//! - `memory`: the agent's RSS when idle, the coordinator's holding 10,000 finished runs;
//! - `telemetry`: the overhead and throughput with OTLP export off, then on.
//!
//! Each prints its figures with the target and PASS or MISS; the last line is machine-readable:
//! `perf overhead_p50_ms=.. cancel_p50_ms=.. log_p50_ms=.. drain_overhead_ms_per_run=..
//! webhooks_per_s=.. agent_idle_rss_mb=.. coordinator_rss_mb_10k=..` (`na` for what did not run).
//! A MISS is a result, not a failure: the exit code is 1 only when a measurement could not be
//! made. Needs `SLIMCI_DBT` for the harness (and its Python, for the memory fill).

mod cancel;
mod cluster;
mod log_latency;
mod memory;
mod overhead;
mod report;
mod telemetry;
mod throughput;
mod webhooks;

use std::future::Future;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use slimci_tests::measure::{load_average, mb};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Measure {
    Overhead,
    Cancel,
    Log,
    Throughput,
    Webhooks,
    Memory,
    Telemetry,
}

#[derive(Parser)]
#[command(about = "slimci performance figures against the targets of the performance issue")]
pub struct Args {
    /// Only these measurements (comma-separated or repeated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Measure>,
    /// Sequential CI runs timed for the runner overhead.
    #[arg(long, default_value_t = 30)]
    pub overhead_runs: usize,
    /// Supersede-and-cancel repetitions.
    #[arg(long, default_value_t = 10)]
    pub cancel_reps: usize,
    /// Log lines followed for the log latency ...
    #[arg(long, default_value_t = 50)]
    pub log_lines: u32,
    /// ... printed this far apart.
    #[arg(long, default_value_t = 200)]
    pub log_interval_ms: u64,
    /// Runs queued for the throughput (at most 1000).
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    #[arg(long, default_value_t = 4)]
    pub agents: usize,
    #[arg(long, default_value_t = 2)]
    pub slots: u16,
    /// How long the throughput run may take before its figure is taken from what finished.
    #[arg(long, default_value_t = 300)]
    pub throughput_deadline_secs: u64,
    /// Webhook deliveries timed.
    #[arg(long, default_value_t = 2400)]
    pub webhooks: usize,
    /// Concurrent webhook connections.
    #[arg(long, default_value_t = 48)]
    pub connections: usize,
    /// Finished runs in the coordinator's store for its memory figure.
    #[arg(long, default_value_t = 10_000)]
    pub stored_runs: usize,
    /// Telemetry: rounds of (off, on), each `--overhead-runs` sequential runs and a burst.
    #[arg(long, default_value_t = 2)]
    pub telemetry_rounds: usize,
    /// Telemetry: instant builds per burst.
    #[arg(long, default_value_t = 100)]
    pub telemetry_burst: u64,
}

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
    /// Telemetry on over off: the overhead p50, and the time per run of a burst.
    telemetry_overhead_ratio: Option<f64>,
    telemetry_per_run_ratio: Option<f64>,
}

/// A figure of the last line: one decimal, `na` for none.
fn figure(value: Option<f64>) -> String {
    value.map_or_else(|| "na".to_owned(), |value| format!("{value:.1}"))
}

/// The measurements run and those that could not be made, with why.
struct Session<'a> {
    args: &'a Args,
    figures: Figures,
    failed: Vec<(&'static str, String)>,
}

impl Session<'_> {
    /// Runs one measurement if it was chosen: says so with the machine's load first, then on
    /// success hands its result to `record`, on failure notes why.
    async fn measure<T, F: Future<Output = anyhow::Result<T>>>(
        &mut self,
        which: Measure,
        name: &'static str,
        measurement: F,
        record: impl FnOnce(&mut Figures, T),
    ) {
        if !self.args.only.is_empty() && !self.args.only.contains(&which) {
            return;
        }
        println!(
            "[{name}] starting; machine load average {} (1 min)",
            load_average()
        );
        match measurement.await {
            Ok(result) => record(&mut self.figures, result),
            Err(error) => self.failed.push((name, format!("{error:#}"))),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut session = Session {
        args: &args,
        figures: Figures::default(),
        failed: Vec::new(),
    };
    let started = Instant::now();
    session
        .measure(
            Measure::Overhead,
            "overhead",
            overhead::overhead(&args),
            |figures, result| {
                figures.overhead_p50_ms = Some(result.p50);
                println!(
                    "  agent RSS: {:.1} MB after start-up, {:.1} MB after {} runs",
                    mb(result.agent_rss_start_kb),
                    mb(result.agent_rss_after_kb),
                    args.overhead_runs + 2
                );
            },
        )
        .await;
    session
        .measure(
            Measure::Cancel,
            "cancel",
            cancel::cancel(&args),
            |figures, p50| figures.cancel_p50_ms = Some(p50),
        )
        .await;
    session
        .measure(
            Measure::Log,
            "log",
            log_latency::log_latency(&args),
            |figures, p50| figures.log_p50_ms = Some(p50),
        )
        .await;
    session
        .measure(
            Measure::Throughput,
            "throughput",
            throughput::throughput(&args),
            |figures, per_run_ms| figures.drain_overhead_ms_per_run = Some(per_run_ms),
        )
        .await;
    session
        .measure(
            Measure::Webhooks,
            "webhooks",
            webhooks::webhooks(&args),
            |figures, rate| figures.webhooks_per_s = Some(rate),
        )
        .await;
    session
        .measure(
            Measure::Memory,
            "memory",
            memory::memory(&args),
            |figures, result| {
                figures.agent_idle_rss_mb = result.agent_idle_kb.map(|kb| kb as f64 / 1024.0);
                figures.coordinator_rss_mb_10k = result.coordinator_kb.map(|kb| kb as f64 / 1024.0);
            },
        )
        .await;
    session
        .measure(
            Measure::Telemetry,
            "telemetry",
            telemetry::telemetry(&args),
            |figures, cost| {
                figures.telemetry_overhead_ratio = Some(cost.overhead_on_ms / cost.overhead_off_ms);
                figures.telemetry_per_run_ratio = Some(cost.per_run_on_ms / cost.per_run_off_ms);
            },
        )
        .await;
    let Session {
        figures, failed, ..
    } = session;
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
        "perf overhead_p50_ms={} cancel_p50_ms={} log_p50_ms={} drain_overhead_ms_per_run={} webhooks_per_s={} agent_idle_rss_mb={} coordinator_rss_mb_10k={} telemetry_overhead_on_off={} telemetry_per_run_on_off={}",
        figure(figures.overhead_p50_ms),
        figure(figures.cancel_p50_ms),
        figure(figures.log_p50_ms),
        figure(figures.drain_overhead_ms_per_run),
        figure(figures.webhooks_per_s),
        figure(figures.agent_idle_rss_mb),
        figure(figures.coordinator_rss_mb_10k),
        figures
            .telemetry_overhead_ratio
            .map_or_else(|| "na".to_owned(), |ratio| format!("{ratio:.3}")),
        figures
            .telemetry_per_run_ratio
            .map_or_else(|| "na".to_owned(), |ratio| format!("{ratio:.3}")),
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
