//! `bench/web`: the weight and the first render of a run's page for a build of 2,000 nodes.
//!
//! Starts the harness's cluster (RabbitMQ on 127.0.0.1:5672, the real coordinator and agent,
//! the stub dbt on `tests/fixtures/stub`), deploys, then runs a CI build whose stub reports
//! `--nodes` models on `--threads` dbt threads, one failing test and `--deferred` deferred
//! parents. Then it measures, printing medians:
//!
//! - page weight: the bytes of `/runs/{id}` (HTML with the inline timeline) plus the
//!   stylesheet and script it loads, uncompressed (target < 100 KB);
//! - server time: request sent to the last byte of the HTML, over `--requests` requests;
//! - first render in headless Chromium: navigation start to first contentful paint (and to
//!   `DOMContentLoaded`), over `--loads` fresh loads (target < 100 ms).
//!
//! For context it also times Chromium's floor: as many loads of a trivial page (one paragraph,
//! no stylesheet) served by the bench itself, in the same browser right after, which no page
//! beats on this machine at this load; the target stays on the run page's own paint.
//!
//! The last line is machine-readable:
//! `web nodes=.. page_kb=.. total_kb=.. server_p50_ms=.. fcp_p50_ms=.. dcl_p50_ms=.. floor_fcp_p50_ms=..`.
//!
//! Two options help find where the time goes: `--save DIR` writes the run page as served
//! (`DIR/run.html`, `DIR/static/slimci.css`, `DIR/static/slimci.js`), so variants of it can be
//! served by any static server; `--url URL` starts no cluster and times the first render of
//! `URL` (and the floor) the same way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use slimci_client::{RunRequest, RunStatus};
use slimci_tests::browser::Browser;
use slimci_tests::origin::git;
use slimci_tests::{Cluster, ClusterOptions, binary, ci_request, deploy_request, workspace_root};

#[derive(Parser)]
#[command(about = "weight and first render of a run's web page for a large build")]
struct Args {
    /// Models in the build.
    #[arg(long, default_value_t = 2000)]
    nodes: u32,
    /// dbt threads they run on.
    #[arg(long, default_value_t = 8)]
    threads: u32,
    /// Parents deferred to production.
    #[arg(long, default_value_t = 40)]
    deferred: u32,
    /// Requests timed for the server time.
    #[arg(long, default_value_t = 30)]
    requests: usize,
    /// Fresh page loads timed in Chromium.
    #[arg(long, default_value_t = 9)]
    loads: usize,
    /// Write the run page, its stylesheet and its script into this directory.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Start no cluster: time only the first render of this page.
    #[arg(long)]
    url: Option<String>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn verdict(value: f64, target: f64) -> &'static str {
    if value < target { "PASS" } else { "MISS" }
}

/// The timings of fresh loads of one page in Chromium, one value per load.
struct FirstRender {
    /// Navigation start to first contentful paint.
    fcp: Vec<f64>,
    /// Navigation start to the end of `DOMContentLoaded`.
    dcl: Vec<f64>,
}

/// Loads `url` `loads` times in `browser` and reads the paint and navigation timings the page
/// recorded. A new query each time, so every load is a navigation of its own.
async fn first_render(
    browser: &mut Browser,
    url: &str,
    loads: usize,
) -> anyhow::Result<FirstRender> {
    let mut render = FirstRender {
        fcp: Vec::with_capacity(loads),
        dcl: Vec::with_capacity(loads),
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    for load in 0..loads {
        browser
            .open(&format!("{url}{separator}load={load}"))
            .await?;
        browser
            .wait_until(
                "the first paint to be recorded",
                "performance.getEntriesByType('paint').length > 0",
                Duration::from_secs(10),
            )
            .await
            .ok();
        let timing = browser
            .eval(
                "(() => { const nav = performance.getEntriesByType('navigation')[0]; \
                 const paint = performance.getEntriesByName('first-contentful-paint')[0] || performance.getEntriesByName('first-paint')[0]; \
                 return { dcl: nav ? nav.domContentLoadedEventEnd : null, fcp: paint ? paint.startTime : null }; })()",
            )
            .await?;
        if let Some(value) = timing["fcp"].as_f64() {
            render.fcp.push(value);
        }
        if let Some(value) = timing["dcl"].as_f64() {
            render.dcl.push(value);
        }
    }
    Ok(render)
}

/// A trivial page served on a port of its own, for Chromium's floor; served until dropped.
struct FloorPage {
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl FloorPage {
    async fn serve() -> anyhow::Result<FloorPage> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|| async {
                axum::response::Html(
                    "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>floor</title></head><body><p>A trivial page.</p></body></html>",
                )
            }),
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FloorPage { url, server })
    }
}

impl Drop for FloorPage {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The run page's first render, then Chromium's floor in the same browser, right after.
async fn first_renders(url: &str, loads: usize) -> anyhow::Result<(FirstRender, FirstRender)> {
    let floor_page = FloorPage::serve().await?;
    let browser_dir = tempfile::tempdir()?;
    let mut browser = Browser::start(browser_dir.path()).await?;
    let page = first_render(&mut browser, url, loads).await?;
    let floor = first_render(&mut browser, &floor_page.url, loads).await?;
    Ok((page, floor))
}

fn print_first_renders(page: &FirstRender, floor: &FirstRender) {
    let fcp_p50 = median(page.fcp.clone());
    println!(
        "first contentful paint p50 ({} loads) {fcp_p50:6.1} ms  target < 100 ms   {}  (min {:.1}, max {:.1})",
        page.fcp.len(),
        verdict(fcp_p50, 100.0),
        page.fcp.iter().copied().fold(f64::INFINITY, f64::min),
        page.fcp.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    println!(
        "DOMContentLoaded p50            {:8.1} ms",
        median(page.dcl.clone())
    );
    println!(
        "Chromium's floor: a trivial page's first contentful paint p50 {:.1} ms, DOMContentLoaded {:.1} ms (context, no target)",
        median(floor.fcp.clone()),
        median(floor.dcl.clone()),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.url {
        let (page, floor) = first_renders(url, args.loads).await?;
        println!("first render of {url}");
        print_first_renders(&page, &floor);
        return Ok(());
    }
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 1,
        slots: 1,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        ..Default::default()
    })
    .await?;
    let stub = json!({ "duration_ms": 100, "nodes": 3 }).to_string();
    let sha = cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub)?;
    let deploy = cluster
        .create_run(&RunRequest {
            sha: Some(sha),
            git_ref: Some("main".to_owned()),
            ..deploy_request()
        })
        .await?;
    let deploy = cluster
        .wait_for_run(deploy.id, Duration::from_secs(120))
        .await?;
    anyhow::ensure!(deploy.status == RunStatus::Success, "deploy: {deploy:?}");
    let big = json!({
        "duration_ms": 4000, "exit_code": 1, "nodes": args.nodes, "threads": args.threads,
        "failing_test": "Got 3 results, configured to fail if != 0", "deferred": args.deferred,
        "log_lines": 400,
    })
    .to_string();
    let current = git(&cluster.origin.path, &["show", "main:slimci_stub.json"])?;
    let sha = cluster
        .origin
        .pull_request(1, &[("slimci_stub.json", &current, &big)])?;
    let run = cluster.create_run(&ci_request(1, &sha)).await?;
    let run = cluster
        .wait_for_run(run.id, Duration::from_secs(300))
        .await?;
    anyhow::ensure!(run.status == RunStatus::Failed, "the large build: {run:?}");
    let page_url = format!("{}/runs/{}", cluster.url, run.id);

    let http = slimci_tests::cluster::http_client();
    let html = http
        .get(&page_url)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let mut total = html.len();
    if let Some(dir) = &args.save {
        std::fs::create_dir_all(dir.join("static"))?;
        std::fs::write(dir.join("run.html"), &html)?;
    }
    for asset in ["static/slimci.css", "static/slimci.js"] {
        let body = http
            .get(format!("{}/{asset}", cluster.url))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        total += body.len();
        if let Some(dir) = &args.save {
            std::fs::write(dir.join(asset), &body)?;
        }
    }
    let html_text = String::from_utf8_lossy(&html);
    anyhow::ensure!(
        html_text.contains("<svg class=\"timeline\""),
        "the page has no timeline"
    );
    let svg_bytes = html_text
        .find("<svg class=\"timeline\"")
        .and_then(|start| {
            html_text[start..]
                .find("</svg>")
                .map(|end| end + "</svg>".len())
        })
        .unwrap_or_default();

    let mut server = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let started = Instant::now();
        let body = http.get(&page_url).send().await?.bytes().await?;
        server.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            body.len() == html.len(),
            "the page changed between requests"
        );
    }

    let (page, floor) = first_renders(&page_url, args.loads).await?;

    let page_kb = html.len() as f64 / 1000.0;
    let total_kb = total as f64 / 1000.0;
    let server_p50 = median(server);
    let fcp_p50 = median(page.fcp.clone());
    let dcl_p50 = median(page.dcl.clone());
    let floor_p50 = median(floor.fcp.clone());
    println!(
        "run page of a build of {} nodes on {} threads ({} deferred), {} node rows shown",
        args.nodes + 1,
        args.threads,
        args.deferred,
        html_text.matches("<tr class=\"node ").count()
    );
    println!(
        "page weight (HTML)              {page_kb:8.1} KB  (timeline SVG {:.1} KB)",
        svg_bytes as f64 / 1000.0
    );
    println!(
        "page weight (HTML + CSS + JS)   {total_kb:8.1} KB  target < 100 KB   {}",
        verdict(total_kb, 100.0)
    );
    println!(
        "server time p50 ({} requests)   {server_p50:8.1} ms",
        args.requests
    );
    print_first_renders(&page, &floor);
    println!(
        "web nodes={} page_kb={page_kb:.1} total_kb={total_kb:.1} server_p50_ms={server_p50:.1} fcp_p50_ms={fcp_p50:.1} dcl_p50_ms={dcl_p50:.1} floor_fcp_p50_ms={floor_p50:.1}",
        args.nodes + 1
    );
    Ok(())
}
