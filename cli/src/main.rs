//! `slimci`: trigger and follow dbt Slim CI runs, deploy, list runs, read logs, cancel.
//!
//! Exit codes of `trigger` and `deploy` (and `logs --follow`): 0 success, 1 the build failed
//! (models or tests), 2 anything else (error, cancelled, superseded, timed out, bad request).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde_json::Value;

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
    /// Show a run: status, phases, node results, the production state it compared against.
    Show {
        run: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running run.
    Cancel { run: String },
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
}

struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base.trim_end_matches('/'))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the slimci coordinator at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"].as_str().unwrap_or("no details");
        bail!("{message} (HTTP {status})")
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        Ok(self.send(request).await?.json().await?)
    }

    async fn run(&self, id: &str) -> anyhow::Result<Value> {
        self.json(self.request(reqwest::Method::GET, &format!("/runs/{id}")))
            .await
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = Client {
        base: cli.coordinator.clone(),
        token: cli.token.clone(),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client"),
    };
    match execute(&client, cli.command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("slimci: {error:#}");
            ExitCode::from(2)
        }
    }
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
            let body = serde_json::json!({ "repository": repo, "kind": "ci", "pr": pr, "sha": sha, "ref": git_ref });
            submit(client, body, no_follow).await
        }
        Command::Deploy {
            repo,
            git_ref,
            sha,
            no_follow,
        } => {
            let body = serde_json::json!({ "repository": repo, "kind": "deploy", "sha": sha, "ref": git_ref });
            submit(client, body, no_follow).await
        }
        Command::Runs {
            repo,
            status,
            limit,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(repo.map(|repo| ("repository", repo)));
            query.extend(status.map(|status| ("status", status)));
            let runs = client
                .json(client.request(reqwest::Method::GET, "/runs").query(&query))
                .await?;
            print_runs(runs.as_array().map(Vec::as_slice).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { run, follow } => {
            if follow {
                return follow_to_the_end(client, &run).await;
            }
            let text = client
                .send(client.request(reqwest::Method::GET, &format!("/runs/{run}/logs")))
                .await?
                .text()
                .await?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { run, json } => {
            let run = client.run(&run).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
            } else {
                print_summary(&run);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown {
            repo,
            pr,
            no_follow,
        } => {
            let path = format!(
                "/repositories/{}/pulls/{pr}/teardown",
                repo.replace('/', "%2F")
            );
            let run = client
                .json(client.request(reqwest::Method::POST, &path))
                .await?;
            let id = run["id"]
                .as_str()
                .ok_or_else(|| anyhow!("the coordinator answered without a run id"))?
                .to_owned();
            eprintln!(
                "slimci: teardown run {id} {}",
                run["status"].as_str().unwrap_or("?")
            );
            if no_follow || run_is_terminal(&run) {
                println!("{id}");
                return Ok(if run_is_terminal(&run) {
                    exit_code(&run)
                } else {
                    ExitCode::SUCCESS
                });
            }
            follow_to_the_end(client, &id).await
        }
        Command::Cancel { run } => {
            let run = client
                .json(client.request(reqwest::Method::POST, &format!("/runs/{run}/cancel")))
                .await?;
            let state = if run["status"] == "cancelled" {
                "cancelled"
            } else {
                "cancel requested; the agent stops the build"
            };
            println!("run {}: {state}", run["id"].as_str().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn submit(client: &Client, body: Value, no_follow: bool) -> anyhow::Result<ExitCode> {
    let run = client
        .json(client.request(reqwest::Method::POST, "/runs").json(&body))
        .await?;
    let id = run["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the coordinator answered without a run id"))?
        .to_owned();
    eprintln!(
        "slimci: run {id} {} ({})",
        run["status"].as_str().unwrap_or("?"),
        run["url"].as_str().unwrap_or_default()
    );
    if run_is_terminal(&run) {
        print_summary(&run);
        return Ok(exit_code(&run));
    }
    if no_follow {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    follow_to_the_end(client, &id).await
}

/// Streams the run's log until it ends, prints the summary, and exits with the run's result.
async fn follow_to_the_end(client: &Client, id: &str) -> anyhow::Result<ExitCode> {
    follow_run(client, id).await?;
    let run = client.run(id).await?;
    print_summary(&run);
    Ok(exit_code(&run))
}

fn run_is_terminal(run: &Value) -> bool {
    !matches!(run["status"].as_str(), Some("queued" | "running"))
}

fn exit_code(run: &Value) -> ExitCode {
    match run["status"].as_str() {
        Some("success") => ExitCode::SUCCESS,
        Some("failed") => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

/// Streams the run's log (server-sent events) until the `end` event, resuming after a dropped
/// connection from the last line seen.
async fn follow_run(client: &Client, id: &str) -> anyhow::Result<()> {
    let progress_to_terminal = std::io::stderr().is_terminal();
    let mut last_line: u64 = 0;
    let mut failures = 0;
    loop {
        let request = client
            .request(reqwest::Method::GET, &format!("/runs/{id}/logs"))
            .query(&[("follow", "true")])
            .header("Last-Event-ID", last_line.to_string());
        let response = match client.send(request).await {
            Ok(response) => response,
            Err(error) if failures < 30 => {
                failures += 1;
                eprintln!("slimci: lost the log stream ({error:#}); reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        failures = 0;
        let mut body = response.bytes_stream();
        let mut buffer = Vec::new();
        let mut progress_shown = false;
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = find_event_end(&buffer) {
                let raw: Vec<u8> = buffer.drain(..end).collect();
                let event = parse_event(&String::from_utf8_lossy(&raw));
                let mut stdout = std::io::stdout().lock();
                match event.name.as_str() {
                    "log" => {
                        if progress_shown {
                            eprint!("\r\x1b[K");
                            progress_shown = false;
                        }
                        let _ = writeln!(stdout, "{}", event.data);
                        if let Some(id) = event.id.and_then(|id| id.parse().ok()) {
                            last_line = id;
                        }
                    }
                    "progress" if progress_to_terminal => {
                        let progress: Value =
                            serde_json::from_str(&event.data).unwrap_or(Value::Null);
                        let _ = stdout.flush();
                        eprint!(
                            "\r\x1b[K[{}/{} nodes done]",
                            progress["done"], progress["total"]
                        );
                        progress_shown = true;
                    }
                    "end" => {
                        if progress_shown {
                            eprintln!();
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
        // The stream closed without `end`: the coordinator restarted or the connection broke.
        if run_is_terminal(&client.run(id).await?) && failures > 0 {
            return Ok(());
        }
        failures += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(2)
        .position(|window| window == b"\n\n")
        .map(|at| at + 2)
}

struct SseEvent {
    name: String,
    data: String,
    id: Option<String>,
}

fn parse_event(raw: &str) -> SseEvent {
    let mut event = SseEvent {
        name: "message".to_owned(),
        data: String::new(),
        id: None,
    };
    let mut data_lines = Vec::new();
    for line in raw.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            event.name = value.trim_start().to_owned();
        } else if let Some(value) = line.strip_prefix("data:") {
            data_lines.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
        } else if let Some(value) = line.strip_prefix("id:") {
            event.id = Some(value.trim().to_owned());
        }
    }
    event.data = data_lines.join("\n");
    event
}

fn print_runs(runs: &[Value]) {
    println!(
        "{:<36}  {:<6}  {:<16}  {:>5}  {:<12}  {:<10}  {:>8}  CREATED",
        "ID", "KIND", "REPOSITORY", "PR", "SHA", "STATUS", "SECONDS"
    );
    for run in runs {
        println!(
            "{:<36}  {:<6}  {:<16}  {:>5}  {:<12}  {:<10}  {:>8}  {}",
            run["id"].as_str().unwrap_or_default(),
            run["kind"].as_str().unwrap_or_default(),
            run["repository"].as_str().unwrap_or_default(),
            run["pr"]
                .as_u64()
                .map(|pr| pr.to_string())
                .unwrap_or_else(|| "-".into()),
            run["sha"]
                .as_str()
                .map(|sha| &sha[..12.min(sha.len())])
                .unwrap_or("-"),
            run["status"].as_str().unwrap_or_default(),
            run["duration_s"]
                .as_f64()
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "-".into()),
            run["created_at"].as_str().unwrap_or_default(),
        );
    }
}

fn print_summary(run: &Value) {
    let what = match (run["kind"].as_str(), run["pr"].as_u64()) {
        (Some("ci"), Some(pr)) => format!(
            "ci of {} PR #{pr}",
            run["repository"].as_str().unwrap_or_default()
        ),
        (Some("teardown"), Some(pr)) => format!(
            "teardown of {} PR #{pr}",
            run["repository"].as_str().unwrap_or_default()
        ),
        _ => format!(
            "deploy of {}",
            run["repository"].as_str().unwrap_or_default()
        ),
    };
    let sha = run["sha"]
        .as_str()
        .map(|sha| format!(" at {}", &sha[..12.min(sha.len())]))
        .unwrap_or_default();
    let duration = run["duration_s"]
        .as_f64()
        .map(|s| format!(" in {s:.1} s"))
        .unwrap_or_default();
    println!();
    println!(
        "run {} — {what}{sha}: {}{duration}",
        run["id"].as_str().unwrap_or_default(),
        run["status"].as_str().unwrap_or("?")
    );
    if let Some(state) = run["production_state"].as_object() {
        let state_sha = state.get("sha").and_then(Value::as_str).unwrap_or_default();
        println!(
            "compared against production state of deploy {} (commit {})",
            state
                .get("deploy_run_id")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            &state_sha[..12.min(state_sha.len())]
        );
    }
    if let Some(caches) = run["caches"].as_object() {
        let mut used: Vec<String> = ["git", "state", "deps"]
            .iter()
            .filter_map(|name| Some(format!("{name} {}", caches.get(*name)?.as_str()?)))
            .collect();
        if let Some(parse) = caches.get("parse").and_then(Value::as_str) {
            used.push(match caches.get("parse_reason").and_then(Value::as_str) {
                Some(reason) => format!("{parse} parse ({reason})"),
                None => format!("{parse} parse"),
            });
        }
        if !used.is_empty() {
            println!("caches: {}", used.join(", "));
        }
    }
    if let Some(message) = run["message"].as_str() {
        println!("{message}");
    }
    if let Some(position) = run["queue_position"].as_u64() {
        println!("waiting to start: position {position} in line");
    }
    let summary = &run["summary"];
    if summary.is_object() {
        println!();
        println!(
            "  {:>8}  {:>6}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7}",
            "selected", "built", "passed", "failed", "warned", "errors", "skipped"
        );
        let count = |key: &str| summary[key].as_u64().unwrap_or_default();
        println!(
            "  {:>8}  {:>6}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7}",
            count("selected"),
            count("built"),
            count("tests_passed"),
            count("tests_failed"),
            count("warned"),
            count("errored"),
            count("skipped")
        );
    }
    let failures: Vec<&Value> = run["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter(|node| {
                    matches!(
                        node["status"].as_str(),
                        Some("fail" | "error" | "runtime error")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if !failures.is_empty() {
        println!();
        println!("failures:");
        for node in failures {
            println!(
                "  {} {}: {}",
                node["status"].as_str().unwrap_or_default().to_uppercase(),
                node["unique_id"].as_str().unwrap_or_default(),
                node["message"]
                    .as_str()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_sent_events_parse() {
        let raw = "event: log\nid: 7\ndata: 14:15:56  1 of 2 OK\n\n";
        let end = find_event_end(raw.as_bytes()).unwrap();
        let event = parse_event(&raw[..end]);
        assert_eq!(event.name, "log");
        assert_eq!(event.id.as_deref(), Some("7"));
        assert_eq!(event.data, "14:15:56  1 of 2 OK");
    }

    #[test]
    fn exit_codes_follow_the_status() {
        assert_eq!(
            exit_code(&serde_json::json!({"status": "success"})),
            ExitCode::SUCCESS
        );
        assert_eq!(
            exit_code(&serde_json::json!({"status": "failed"})),
            ExitCode::from(1)
        );
        assert_eq!(
            exit_code(&serde_json::json!({"status": "cancelled"})),
            ExitCode::from(2)
        );
    }
}
