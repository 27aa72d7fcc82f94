//! The coordinator's web pages in a real browser (Debian's headless Chromium): the run list,
//! a run's page in every status (nodes, the failed test's message, the deferred count, the
//! build's timeline), a repository, the fleet with its queue; the live log following a build;
//! the login a coordinator with an API token requires; a forged cancel refused.
//!
//! Real coordinator, agent and RabbitMQ, with the stub dbt (tests/src/bin/slimci-stub-dbt.rs)
//! for speed; the fake GitHub (`github.rs`) for a deploy by `push` webhook, and an OTLP
//! receiver (`otlp.rs`) so runs have traces. Screenshots are kept in `target/web-screenshots/`.

use std::time::Duration;

use serde_json::{Value, json};
use slimci_client::{RunRequest, RunStatus, RunView, Trigger};
use slimci_proto::RunId;
use slimci_tests::browser::{Browser, dump_dom, screenshot, screenshot_dir};
use slimci_tests::cluster::http_client;
use slimci_tests::github::{FakeGitHub, push_payload};
use slimci_tests::origin::git;
use slimci_tests::otlp::OtlpReceiver;
use slimci_tests::{
    Cluster, ClusterOptions, WEBHOOK_SECRET, binary, ci_request, deploy_request, workspace_root,
};

const TIMEOUT: Duration = Duration::from_secs(120);
const FAILED_TEST_MESSAGE: &str = "Got 3 results, configured to fail if != 0";

fn stub_options(repository_toml: &str) -> ClusterOptions {
    ClusterOptions {
        agents: 1,
        slots: 1,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        repository_toml: repository_toml.to_owned(),
        ..Default::default()
    }
}

/// A pull request whose stub build behaves as `stub` (main's stub file changed); returns its
/// commit.
fn pull_request(cluster: &Cluster, pr: u64, stub: &Value) -> String {
    let current = git(&cluster.origin.path, &["show", "main:slimci_stub.json"]).unwrap();
    cluster
        .origin
        .pull_request(pr, &[("slimci_stub.json", &current, &stub.to_string())])
        .unwrap()
}

async fn deploy_with(cluster: &mut Cluster, stub: &Value) -> RunView {
    let sha = cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub.to_string())
        .unwrap();
    cluster
        .create_run(&RunRequest {
            sha: Some(sha),
            git_ref: Some("main".to_owned()),
            ..deploy_request()
        })
        .await
        .unwrap()
}

/// The text of an HTML page without its tags (enough to search for what a reader sees).
fn text_of(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&quot;", "\"")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

const GITHUB_REPOSITORY: &str = "acme/shop";
const GITHUB_TOKEN: &str = "e2e-web-github-token";

/// Deploys a commit of main made for `stub` through GitHub's `push` webhook, as a merge would.
async fn deploy_by_push(cluster: &mut Cluster, stub: &Value) -> RunId {
    let sha = cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub.to_string())
        .unwrap();
    let (status, answer) = cluster
        .webhook(
            "push",
            &uuid::Uuid::new_v4().to_string(),
            &push_payload(GITHUB_REPOSITORY, "refs/heads/main", &sha),
            Some(WEBHOOK_SECRET),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{answer}");
    RunId::parse(answer["run"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_show_runs_in_every_status_in_chromium() {
    // Builds of more than 60 s time out, so one can be seen running and then timed out. The
    // repository is on the fake GitHub (deploys come by webhook), and the coordinator exports
    // traces, so runs have trace ids.
    let github = FakeGitHub::start().await;
    github.accept_token(GITHUB_TOKEN);
    let receiver = OtlpReceiver::start().await.unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        coordinator_toml: format!(
            "[github]\napi_url = \"{}\"\nwebhook_secret = \"{WEBHOOK_SECRET}\"\ntoken = \"{GITHUB_TOKEN}\"\n\n[telemetry]\nenabled = true\nendpoint = \"{}\"\n",
            github.url, receiver.url
        ),
        ..stub_options(&format!(
            "run_timeout_secs = 60\ngithub = \"{GITHUB_REPOSITORY}\""
        ))
    })
    .await
    .unwrap();
    let work = cluster.dir.path().join("chromium");
    std::fs::create_dir_all(&work).unwrap();
    let deploy = deploy_by_push(&mut cluster, &json!({ "duration_ms": 200, "nodes": 3 })).await;
    let deploy = cluster.wait_for_run(deploy, TIMEOUT).await.unwrap();
    assert_eq!(deploy.status, RunStatus::Success, "{deploy:?}");
    // The API says who triggered it: the webhook's delivery, its event and sender.
    assert!(
        matches!(
            &deploy.trigger,
            Some(Trigger::Github { event, sender: Some(sender), .. })
                if event == "push" && sender == "analyst"
        ),
        "{:?}",
        deploy.trigger
    );

    // failed: a test fails, two models are built on 4 threads, five parents are deferred.
    let sha = pull_request(
        &cluster,
        1,
        &json!({ "duration_ms": 400, "exit_code": 1, "nodes": 24, "threads": 4,
                 "failing_test": FAILED_TEST_MESSAGE, "deferred": 5 }),
    );
    let failed = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    let failed = cluster.wait_for_run(failed.id, TIMEOUT).await.unwrap();
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    assert_eq!(failed.deferred.len(), 5, "{failed:?}");

    assert_eq!(
        failed.trigger,
        Some(Trigger::Api { user_agent: None }),
        "the test's own HTTP client is an API caller"
    );
    let failed_trace = failed.trace_id.clone().expect("traces are exported");

    // error: dbt exits 2; asked for with the `slimci` CLI.
    let sha = pull_request(&cluster, 2, &json!({ "duration_ms": 100, "exit_code": 2 }));
    let output = cluster
        .run_cli(&[
            "trigger",
            "--repo",
            "shop",
            "--pr",
            "2",
            "--sha",
            &sha,
            "--no-follow",
        ])
        .await;
    assert!(output.status.success(), "{output:?}");
    let errored = RunId::parse(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
    let errored = cluster.wait_for_run(errored, TIMEOUT).await.unwrap();
    assert_eq!(errored.status, RunStatus::Error, "{errored:?}");
    assert!(
        matches!(&errored.trigger, Some(Trigger::Cli { version: Some(_) })),
        "{:?}",
        errored.trigger
    );

    // superseded: a newer commit of PR 3 replaces a building one.
    let old_sha = pull_request(&cluster, 3, &json!({ "duration_ms": 600_000 }));
    let old = cluster.create_run(&ci_request(3, &old_sha)).await.unwrap();
    cluster.wait_building(old.id, TIMEOUT).await.unwrap();
    let new_sha = pull_request(&cluster, 3, &json!({ "duration_ms": 100 }));
    let newer = cluster.create_run(&ci_request(3, &new_sha)).await.unwrap();
    let superseded = cluster.wait_for_run(old.id, TIMEOUT).await.unwrap();
    assert_eq!(superseded.status, RunStatus::Superseded, "{superseded:?}");
    let newer = cluster.wait_for_run(newer.id, TIMEOUT).await.unwrap();
    assert_eq!(newer.status, RunStatus::Success, "{newer:?}");

    // running, then timed out: PR 5 builds for longer than the timeout, and holds the slot,
    // so PR 6 waits in the queue and PR 7 is cancelled while it waits.
    let sha = pull_request(
        &cluster,
        5,
        &json!({ "duration_ms": 600_000, "log_lines": 3 }),
    );
    let running = cluster.create_run(&ci_request(5, &sha)).await.unwrap();
    cluster.wait_building(running.id, TIMEOUT).await.unwrap();
    let sha = pull_request(&cluster, 6, &json!({ "duration_ms": 600_000 }));
    let queued = cluster.create_run(&ci_request(6, &sha)).await.unwrap();
    let sha = pull_request(&cluster, 7, &json!({ "duration_ms": 100 }));
    let cancelled = cluster.create_run(&ci_request(7, &sha)).await.unwrap();
    let cancelled = cluster.client.cancel(cancelled.id).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled, "{cancelled:?}");

    let url = &cluster.url.clone();
    // The fleet: the agent as its heartbeats said (busy, its one slot taken, its version), the
    // run it builds linked, and the queue with positions. Read while PR 5 still builds.
    let dom = dump_dom(&format!("{url}/fleet"), &work).await.unwrap();
    let text = text_of(&dom);
    let agent_at = dom
        .find("<tr class=\"agent\" id=\"agent-agent-0\">")
        .unwrap_or_else(|| panic!("no row for agent-0: {text}"));
    let agent_row = &dom[agent_at..agent_at + dom[agent_at..].find("</tr>").unwrap()];
    let agent_text = text_of(agent_row);
    assert!(
        agent_row.contains("<td class=\"a-busy\">busy</td>"),
        "{agent_text}"
    );
    assert!(
        agent_row.contains("<td class=\"slots\">1 of 1</td>"),
        "{agent_text}"
    );
    assert!(
        agent_text.contains(env!("CARGO_PKG_VERSION")),
        "its version: {agent_text}"
    );
    assert!(
        agent_row.contains(&format!("<a href=\"/runs/{}\">ci shop #5</a>", running.id)),
        "the agent builds PR 5: {agent_text}"
    );
    assert!(
        agent_text.contains(" ago "),
        "its last heartbeat: {agent_text}"
    );
    assert!(
        dom.contains("<b id=\"busy-slots\">1</b> of <b id=\"slots\">1</b> busy"),
        "{text}"
    );
    let queue_at = dom.find("id=\"queue\"").unwrap();
    assert_eq!(
        dom[queue_at..].matches("<tr class=\"queued\">").count(),
        1,
        "{text}"
    );
    assert!(text_of(&dom[queue_at..]).contains("1 ci"), "{text}");
    assert!(text.contains("#6"), "{text}");

    // Each run's page, with what its status shows (the running and queued ones first, while
    // they still are), and who or what triggered it.
    let api = "the HTTP API";
    let pages = [
        (running.id, "running", "Following the build", api),
        (queued.id, "queued", "queued for", api),
        (
            deploy.id,
            "success",
            "Deploy of shop",
            "GitHub webhook: push to the production branch by @analyst",
        ),
        (errored.id, "error", "dbt exit code 2", "the slimci CLI "),
        (superseded.id, "superseded", "Superseded by", api),
        (cancelled.id, "cancelled", "cancelled", api),
    ];
    for (id, status, shows, triggered_by) in pages {
        let dom = dump_dom(&format!("{url}/runs/{id}"), &work).await.unwrap();
        let text = text_of(&dom);
        assert!(
            dom.contains(&format!("id=\"status\">{status}</span>")),
            "{id} is not shown {status}: {text}"
        );
        assert!(
            text.contains(shows),
            "{id} ({status}) does not say {shows:?}: {text}"
        );
        assert!(
            text.contains(&format!("Triggered by {triggered_by}")),
            "{id} ({status}) is not said to be triggered by {triggered_by:?}: {text}"
        );
        let cancellable = matches!(status, "running" | "queued");
        assert_eq!(
            dom.contains("id=\"cancel\""),
            cancellable,
            "{status}: {text}"
        );
    }

    // The run list: every status, with its filters.
    let dom = dump_dom(&format!("{url}/"), &work).await.unwrap();
    let text = text_of(&dom);
    for status in [
        "success",
        "failed",
        "error",
        "superseded",
        "running",
        "queued",
        "cancelled",
    ] {
        assert!(
            dom.contains(&format!("class=\"status s-{status}\"")),
            "no {status} run on the list: {text}"
        );
    }
    assert_eq!(dom.matches("<tr class=\"run\">").count(), 8, "{text}");
    let dom = dump_dom(&format!("{url}/?repository=shop&pr=3"), &work)
        .await
        .unwrap();
    assert_eq!(
        dom.matches("<tr class=\"run\">").count(),
        2,
        "{}",
        text_of(&dom)
    );
    let dom = dump_dom(&format!("{url}/?status=failed"), &work)
        .await
        .unwrap();
    assert_eq!(
        dom.matches("<tr class=\"run\">").count(),
        1,
        "{}",
        text_of(&dom)
    );
    assert!(dom.contains(&failed.id.to_string()));

    // The failed run: its nodes, the failed test first with its message, the deferred count,
    // the timeline drawn on four threads, its artifacts, and no cancel button.
    let dom = dump_dom(&format!("{url}/runs/{}", failed.id), &work)
        .await
        .unwrap();
    let text = text_of(&dom);
    assert!(text.contains(FAILED_TEST_MESSAGE), "{text}");
    assert!(
        dom.contains(&format!("<code id=\"trace-id\">{failed_trace}</code>")),
        "the trace id: {text}"
    );
    assert!(text.contains("test.stub.not_null_m0_id"), "{text}");
    assert_eq!(dom.matches("<tr class=\"node ").count(), 25, "{text}");
    let first_node = dom.find("<tr class=\"node ").unwrap();
    assert!(
        dom[first_node..]
            .starts_with("<tr class=\"node bad\"><td>fail</td><td>test.stub.not_null_m0_id"),
        "failures come first: {}",
        &dom[first_node..first_node + 200]
    );
    for index in 0..24 {
        assert!(
            text.contains(&format!("model.stub.m{index} ")),
            "m{index}: {text}"
        );
    }
    assert!(text.contains("5 deferred"), "{text}");
    assert!(text.contains("model.stub.production_4"), "{text}");
    assert!(dom.contains("<svg class=\"timeline\""), "{text}");
    for thread in ["Thread-1", "Thread-2", "Thread-3", "Thread-4"] {
        assert!(text.contains(thread), "{thread}: {text}");
    }
    assert_eq!(dom.matches("<rect x=").count(), 25, "one bar per node");
    // The critical path is outlined: the build ended with a node whose parents the manifest
    // names, or with one of none; either way a path of at least one node, said above it.
    assert!(dom.contains("<path class=\"critical\""), "{dom}");
    assert!(text.contains("outlined, the critical path: "), "{text}");
    assert!(
        text.contains("run_results.json") && text.contains("manifest.json"),
        "{text}"
    );
    assert!(
        !dom.contains("id=\"cancel\""),
        "a finished run has no cancel button"
    );
    assert!(!dom.contains("e2e-agent-token"), "no secret on the page");
    // Filtered to failures only.
    let dom = dump_dom(&format!("{url}/runs/{}?status=failures", failed.id), &work)
        .await
        .unwrap();
    assert_eq!(
        dom.matches("<tr class=\"node ").count(),
        2,
        "{}",
        text_of(&dom)
    );

    // The repository: production state, its pull requests with their isolations.
    let dom = dump_dom(&format!("{url}/repositories/shop"), &work)
        .await
        .unwrap();
    let text = text_of(&dom);
    assert!(
        text.contains(&deploy.id.to_string()),
        "production state: {text}"
    );
    assert_eq!(dom.matches("<tr class=\"pull\">").count(), 6, "{text}");
    for pr in [1, 2, 3, 5, 6, 7] {
        assert!(text.contains(&format!("pr_shop_{pr}")), "PR {pr}: {text}");
    }

    // Screenshots for people: the failed run's page, its timeline, and the run page on a
    // phone.
    let screenshots = screenshot_dir().unwrap();
    screenshot(
        &format!("{url}/runs/{}", failed.id),
        &screenshots.join("run-page.png"),
        1280,
        2200,
    )
    .await
    .unwrap();
    screenshot(
        &format!("{url}/runs/{}/timeline.svg", failed.id),
        &screenshots.join("timeline.png"),
        1000,
        140,
    )
    .await
    .unwrap();
    screenshot(
        &format!("{url}/runs/{}", failed.id),
        &screenshots.join("run-page-phone.png"),
        390,
        1600,
    )
    .await
    .unwrap();
    screenshot(&format!("{url}/"), &screenshots.join("runs.png"), 1280, 900)
        .await
        .unwrap();

    // PR 5 passes its timeout and its page says so.
    let timed_out = cluster.wait_for_run(running.id, TIMEOUT).await.unwrap();
    assert_eq!(timed_out.status, RunStatus::TimedOut, "{timed_out:?}");
    let dom = dump_dom(&format!("{url}/runs/{}", running.id), &work)
        .await
        .unwrap();
    assert!(
        dom.contains("id=\"status\">timed_out</span>"),
        "{}",
        text_of(&dom)
    );
    cluster.assert_all_alive();
}

const API_TOKEN: &str = "e2e-web-api-token-0123456789";

/// Gives the cluster's coordinator an API token (a restart on the same data and address), and
/// the cluster's client that token.
async fn with_api_token(cluster: &mut Cluster) {
    let config = cluster.dir.path().join("coordinator.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen(
        "[auth]\n",
        &format!("[auth]\napi_token = \"{API_TOKEN}\"\n"),
        1,
    );
    std::fs::write(&config, text).unwrap();
    cluster.restart_coordinator().await.unwrap();
    cluster.client =
        slimci_client::Client::with_http(&cluster.url, Some(API_TOKEN.to_owned()), http_client());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_log_follows_a_build_behind_a_login_and_a_forged_cancel_is_refused() {
    let mut cluster = Cluster::start(stub_options("")).await.unwrap();
    with_api_token(&mut cluster).await;
    let url = cluster.url.clone();
    // A deploy printing a line, then a blank one, every 200 ms for a minute and a half.
    let run = deploy_with(
        &mut cluster,
        &json!({ "log_lines": 450, "line_interval_ms": 200, "blank_lines": true, "duration_ms": 0 }),
    )
    .await;
    cluster.wait_building(run.id, TIMEOUT).await.unwrap();
    let run_page = format!("{url}/runs/{}", run.id);

    // Without a session: pages send the browser to the login form, the event stream and the
    // cancel are refused.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let answer = http.get(&run_page).send().await.unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(
        answer.headers()["location"],
        format!("/login?next=/runs/{}", run.id).as_str()
    );
    for path in ["/", "/fleet", "/repositories/shop"] {
        let answer = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 303, "{path}");
    }
    let answer = http.get(format!("{run_page}/events")).send().await.unwrap();
    assert_eq!(answer.status(), 401);
    let answer = http
        .post(format!("{run_page}/cancel"))
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);

    // The browser logs in: a wrong token is refused, the right one leads to the run's page
    // and sets an HttpOnly, SameSite=Strict session cookie that scripts cannot read.
    let mut browser = Browser::start(cluster.dir.path()).await.unwrap();
    browser.open(&run_page).await.unwrap();
    let at = browser.eval("location.pathname").await.unwrap();
    assert_eq!(at, "/login", "{}", browser.html().await.unwrap());
    let type_token = |token: &str| {
        format!(
            "document.querySelector('input[name=token]').value = {}; document.querySelector('form.login').submit(); true",
            json!(token)
        )
    };
    browser
        .eval(&type_token("not-the-token-at-all"))
        .await
        .unwrap();
    browser
        .wait_until(
            "the refusal",
            "document.getElementById('refused') !== null",
            TIMEOUT,
        )
        .await
        .unwrap();
    browser.eval(&type_token(API_TOKEN)).await.unwrap();
    browser
        .wait_until(
            "the run's page after the login",
            &format!(
                "location.pathname === '/runs/{}' && document.readyState === 'complete'",
                run.id
            ),
            TIMEOUT,
        )
        .await
        .unwrap();
    let cookies = browser.cookies(&url).await.unwrap();
    let session = cookies
        .iter()
        .find(|cookie| cookie["name"] == "slimci_session")
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    let value = session["value"].as_str().unwrap().to_owned();
    assert!(
        !value.contains(API_TOKEN),
        "the cookie holds the token: {value}"
    );
    assert_eq!(browser.eval("document.cookie").await.unwrap(), "");
    let html = browser.html().await.unwrap();
    assert!(!html.contains(API_TOKEN), "the page shows the API token");

    // The live log: lines the stub prints after the page loaded appear in it.
    let last_line = |html: &str| -> u64 {
        html.match_indices("stub log line ")
            .filter_map(|(at, _)| {
                html[at + 14..]
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .max()
            .unwrap_or(0)
    };
    let loaded_with = last_line(&html);
    let rendered_after: u64 = browser
        .eval("Number(document.getElementById('log-lines').dataset.after)")
        .await
        .unwrap()
        .as_u64()
        .unwrap();
    let wanted = loaded_with + 5;
    browser
        .wait_until(
            &format!("log line {wanted} to appear on the open page"),
            &format!("document.getElementById('log-lines').textContent.includes('stub log line {wanted} ')"),
            TIMEOUT,
        )
        .await
        .unwrap();
    let after: u64 = browser
        .eval("Number(document.getElementById('log-lines').dataset.after)")
        .await
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(after > rendered_after, "{after} <= {rendered_after}");
    // Blank lines come as events without data, which the browser does not deliver; the page
    // still shows them, from the gaps in the lines' numbers.
    let text = browser
        .eval("document.getElementById('log-lines').textContent")
        .await
        .unwrap();
    let text = text.as_str().unwrap();
    let appended = &text[text
        .find(&format!("stub log line {} ", loaded_with + 1))
        .unwrap_or_else(|| panic!("no line after {loaded_with}:\n{text}"))..];
    let appended = &appended[..appended.find(&format!("stub log line {wanted} ")).unwrap()];
    assert_eq!(
        appended.matches("\n\n").count(),
        (wanted - loaded_with - 1) as usize,
        "a blank line after each line appended live:\n{appended:?}"
    );

    // The stream resumes after a dropped connection (the coordinator restarts): later lines
    // appear, and none twice.
    cluster.restart_coordinator().await.unwrap();
    cluster.client =
        slimci_client::Client::with_http(&cluster.url, Some(API_TOKEN.to_owned()), http_client());
    let text_now = browser
        .eval("document.getElementById('log-lines').textContent")
        .await
        .unwrap();
    let wanted = last_line(text_now.as_str().unwrap()) + 5;
    browser
        .wait_until(
            &format!("log line {wanted} after the coordinator restarted"),
            &format!("document.getElementById('log-lines').textContent.includes('stub log line {wanted} ')"),
            TIMEOUT,
        )
        .await
        .unwrap();
    let log = browser
        .eval("document.getElementById('log-lines').textContent")
        .await
        .unwrap();
    let log = log.as_str().unwrap();
    for number in 0..=wanted {
        let count = log.matches(&format!("stub log line {number} ")).count();
        assert!(count <= 1, "line {number} shown {count} times:\n{log}");
    }

    // A forged cancel, with the session but without the page's CSRF token, is refused and
    // changes nothing; so is one with a wrong token.
    let cookie = format!("slimci_session={value}");
    for form in [vec![], vec![("csrf", "0".repeat(64))]] {
        let answer = http
            .post(format!("{run_page}/cancel"))
            .header("cookie", &cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 403, "{form:?}");
    }
    let still = cluster.run(run.id).await.unwrap();
    assert_eq!(still.status, RunStatus::Running, "{still:?}");
    assert!(!still.cancel_requested, "{still:?}");

    // The page's own cancel button works.
    browser
        .eval("document.getElementById('cancel').click(); true")
        .await
        .unwrap();
    let cancelled = cluster.wait_for_run(run.id, TIMEOUT).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled, "{cancelled:?}");
    cluster.assert_all_alive();
}
