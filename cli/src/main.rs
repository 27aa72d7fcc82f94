//! `slimci`: trigger and follow dbt Slim CI runs, deploy, list runs, read logs, cancel, and
//! show or publish a repository's production state.
//!
//! Exit codes of `trigger` and `deploy` (and `logs --follow`): 0 success, 1 the build failed
//! (models or tests), 2 anything else (error, cancelled, superseded, timed out, bad request).
//!
//! This file holds the arguments and what each command does; `follow` streams a run's log
//! until it ends, `print` writes runs for people. The API calls are `slimci_client::Client`'s.

mod follow;
mod print;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};
use slimci_client::{Client, RunRequest, RunStatus};
use slimci_proto::RunId;

use crate::follow::follow_to_the_end;
use crate::print::{exit_code, print_agents, print_production_state, print_runs, print_summary};

#[derive(Parser)]
#[command(
    name = "slimci",
    version,
    about = "Self-hosted dbt Slim CI: trigger, follow, deploy, inspect"
)]
struct Cli {
    /// Base URL of the slimci coordinator.
    #[arg(
        long,
        global = true,
        env = "SLIMCI_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    coordinator: String,
    /// API token, when the coordinator requires one.
    #[arg(long, global = true, env = "SLIMCI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a pull request's commit (state:modified+, deferred to production), follow it live.
    Trigger {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        pr: u64,
        /// The PR's head commit (full SHA).
        #[arg(long)]
        sha: String,
        /// Ref holding the PR's commits, if not GitHub's `refs/pull/<pr>/head`.
        #[arg(long = "ref")]
        git_ref: Option<String>,
        /// Return once queued instead of following the build.
        #[arg(long)]
        no_follow: bool,
    },
    /// Build the production branch into production; on success it becomes the production state.
    Deploy {
        #[arg(long)]
        repo: String,
        /// Branch to deploy (default: the repository's production branch).
        #[arg(long = "ref")]
        git_ref: Option<String>,
        /// Exact commit to deploy (default: the branch's head).
        #[arg(long)]
        sha: Option<String>,
        #[arg(long)]
        no_follow: bool,
    },
    /// List recent runs.
    Runs {
        #[arg(long)]
        repo: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Print a run's log; with --follow, stream it until the run ends.
    Logs {
        run: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Show a run: status, phases, node results, the production state it compared against, and
    /// the URL of its web page.
    Show {
        run: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running run.
    Cancel { run: String },
    /// List the fleet: each agent's state, slots, busy slots, runs and last heartbeat.
    Agents {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// A pull request was closed: stop its builds and drop its schema or database, then wait
    /// for the drop (for CI systems whose closes slimci does not hear about as webhooks).
    Teardown {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        pr: u64,
        #[arg(long)]
        no_follow: bool,
    },
    /// A repository's production state: the manifest CI runs compare against.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Show the production state: which deploy or publish, its commit and manifest sha256.
    Show {
        #[arg(long)]
        repo: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish the manifest.json of a production run made outside slimci (cron, Airflow, dbt
    /// Cloud) as the repository's production state.
    Publish {
        #[arg(long)]
        repo: String,
        /// The commit that production run built (full SHA).
        #[arg(long)]
        sha: String,
        /// dbt's manifest.json of that run (`target/manifest.json`).
        manifest: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = Client::new(&cli.coordinator, cli.token.clone());
    match execute(&client, cli.command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("slimci: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run_id(text: &str) -> anyhow::Result<RunId> {
    RunId::parse(text).context("not a run id")
}

async fn execute(client: &Client, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Trigger {
            repo,
            pr,
            sha,
            git_ref,
            no_follow,
        } => {
            let request = RunRequest {
                repository: repo,
                kind: Some("ci".to_owned()),
                pr: Some(pr),
                sha: Some(sha),
                git_ref,
            };
            submit(client, &request, no_follow).await
        }
        Command::Deploy {
            repo,
            git_ref,
            sha,
            no_follow,
        } => {
            let request = RunRequest {
                repository: repo,
                kind: Some("deploy".to_owned()),
                pr: None,
                sha,
                git_ref,
            };
            submit(client, &request, no_follow).await
        }
        Command::Runs {
            repo,
            status,
            limit,
        } => {
            let runs = client
                .runs(repo.as_deref(), status.as_deref(), limit)
                .await?;
            print_runs(&runs);
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents { json } => {
            let agents = client.agents().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&agents)?);
            } else {
                print_agents(&agents);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { run, follow } => {
            let id = run_id(&run)?;
            if follow {
                return follow_to_the_end(client, id).await;
            }
            print!("{}", client.logs(id).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { run, json } => {
            let id = run_id(&run)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&client.run_json(id).await?)?
                );
            } else {
                let run = client.run(id).await?;
                print_summary(&run);
                println!("\n{}", run.url);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown {
            repo,
            pr,
            no_follow,
        } => {
            let run = client.teardown(&repo, pr).await?.run;
            eprintln!("slimci: teardown run {} {}", run.id, run.status);
            if no_follow || run.status.is_terminal() {
                println!("{}", run.id);
                return Ok(if run.status.is_terminal() {
                    exit_code(run.status)
                } else {
                    ExitCode::SUCCESS
                });
            }
            follow_to_the_end(client, run.id).await
        }
        Command::State { command } => state(client, command).await,
        Command::Cancel { run } => {
            let run = client.cancel(run_id(&run)?).await?;
            let state = if run.status == RunStatus::Cancelled {
                "cancelled"
            } else {
                "cancel requested; the agent stops the build"
            };
            println!("run {}: {state}", run.id);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn state(client: &Client, command: StateCommand) -> anyhow::Result<ExitCode> {
    match command {
        StateCommand::Show { repo, json } => {
            let production = client.production_state(&repo).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&production)?);
            } else {
                print_production_state(&production);
            }
        }
        StateCommand::Publish {
            repo,
            sha,
            manifest,
        } => {
            let bytes = std::fs::read(&manifest)
                .with_context(|| format!("cannot read {}", manifest.display()))?;
            let sent_sha256 = hex::encode(Sha256::digest(&bytes));
            let production = client.publish_production_state(&repo, &sha, bytes).await?;
            anyhow::ensure!(
                production.manifest_sha256 == sent_sha256,
                "the coordinator stored a manifest with sha256 {}, but {} has sha256 {sent_sha256}",
                production.manifest_sha256,
                manifest.display()
            );
            println!(
                "published {} as the production state of {repo}",
                manifest.display()
            );
            print_production_state(&production);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit(
    client: &Client,
    request: &RunRequest,
    no_follow: bool,
) -> anyhow::Result<ExitCode> {
    let run = client.create_run(request).await?.run;
    eprintln!("slimci: run {} {} ({})", run.id, run.status, run.url);
    if run.status.is_terminal() {
        print_summary(&run);
        return Ok(exit_code(run.status));
    }
    if no_follow {
        println!("{}", run.id);
        return Ok(ExitCode::SUCCESS);
    }
    follow_to_the_end(client, run.id).await
}
