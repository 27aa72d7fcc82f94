//! The long fault-injection run: `bench/faults` (defaults: 200 runs, 3 agents with 2 slots, an
//! agent killed with SIGKILL every 5 s, RabbitMQ restarted once, the coordinator once). Prints
//! the figures; the last line is machine-readable:
//! `faults runs=<n> terminal=<n> lost=<n> overlapping=<n> retries=<n> drain_s=<s>`.
//! Needs `SLIMCI_DBT` only for the harness's checks; builds use the stub dbt.

use std::time::Duration;

use clap::Parser;
use slimci_tests::storm::{StormConfig, storm};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200)]
    runs: usize,
    #[arg(long, default_value_t = 3)]
    agents: usize,
    #[arg(long, default_value_t = 2)]
    slots: u16,
    /// How long each stub build takes.
    #[arg(long, default_value_t = 1500)]
    build_ms: u64,
    /// Seconds between agent kills.
    #[arg(long, default_value_t = 5)]
    kill_every: u64,
    #[arg(long, default_value_t = 1800)]
    deadline_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = storm(StormConfig {
        runs: args.runs,
        agents: args.agents,
        slots: args.slots,
        build_ms: args.build_ms,
        kill_every: Duration::from_secs(args.kill_every),
        deadline: Duration::from_secs(args.deadline_secs),
    })
    .await?;
    report.print();
    if report.lost > 0 || report.overlapping > 0 || report.terminal != report.runs {
        std::process::exit(1);
    }
    Ok(())
}
