//! Webhook intake (measurement 5): signed GitHub deliveries over many connections to a coordinator
//! with no agent (the runs they make just queue): `ping`s to warm up, `pull_request`s on few PRs,
//! then the timed pass of `pull_request`s on many PRs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use slimci_client::RunStatus;
use slimci_tests::WEBHOOK_SECRET;
use slimci_tests::measure::{p50, percentile};

use crate::Args;
use crate::cluster::{deploy, stub_cluster};
use crate::report::verdict;

const WEBHOOKS_TARGET_PER_S: f64 = 1000.0;

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
        p50(&latencies),
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

/// Runs the webhook intake measurement; its figure, the timed pass's accepted deliveries per second.
pub async fn webhooks(args: &Args) -> anyhow::Result<f64> {
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
    let queued = cluster
        .runs_where(Some(RunStatus::Queued), 1000)
        .await?
        .len();
    println!("  runs queued at the end: {queued}");
    Ok(rate)
}
