use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// The slimci agent: builds dbt Slim CI jobs on this runner.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "SLIMCI_AGENT_CONFIG",
        default_value = "/etc/slimci/agent.toml"
    )]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    // The sandbox stages run single-threaded: decide before any runtime starts a thread.
    match std::env::args().nth(1).as_deref() {
        Some(slimci_agent::sandbox::exec::WRAPPER_ARG) => {
            slimci_agent::sandbox::exec::wrapper_main()
        }
        Some(slimci_agent::sandbox::exec::INIT_ARG) => slimci_agent::sandbox::exec::init_main(),
        _ => {}
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(agent_main())
}

async fn agent_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .init();
    let args = Args::parse();
    let config = slimci_agent::config::Config::load(&args.config)?;
    let shutdown = slimci_agent::Shutdown::default();
    tokio::spawn(stop_on_signals(shutdown.clone()));
    slimci_agent::run(config, shutdown)
        .await
        .context("agent stopped")
}

/// First SIGTERM or SIGINT: finish running jobs, take no new ones. Second: cancel them.
async fn stop_on_signals(shutdown: slimci_agent::Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!(
        "draining: finishing running jobs, taking no new ones (signal again to cancel them)"
    );
    shutdown.drain.cancel();
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("cancelling running jobs");
    shutdown.abort.cancel();
}
