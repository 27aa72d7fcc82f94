//! Hostile dbt projects through the real agent: each case of `tests/fixtures/hostile` is a
//! pull request (a CI build, deferring to a deploy of the project) that attacks the runner,
//! and the sandbox must hold. Timings are printed (`--nocapture`) for the record.

use std::time::{Duration, Instant};

use serde_json::Value;
use slimci_client::{RunStatus, RunView};
use slimci_proto::RunId;
use slimci_tests::sandbox::{
    MarkerGuard, add_model, assert_gone, build_pids_current, case, hostile_project, marker,
    processes_with,
};
use slimci_tests::{
    AGENT_TOKEN, AMQP_URL, Cluster, ClusterOptions, ci_request, dump_database, nodes_of,
    sandbox_of, wait_for,
};

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// `sandbox.grace_secs` of every test cluster here.
const GRACE_SECS: u64 = 3;

fn options() -> ClusterOptions {
    ClusterOptions {
        project: Some(hostile_project()),
        sandbox: format!("grace_secs = {GRACE_SECS}"),
        ..Default::default()
    }
}

async fn hostile_cluster(options: ClusterOptions) -> Cluster {
    let mut cluster = Cluster::start(options).await.unwrap();
    if let Err(error) = cluster.deploy().await {
        let mut logs = String::new();
        for run in cluster.runs().await.unwrap() {
            logs += &cluster.log(run.id).await.unwrap();
        }
        panic!(
            "{error}\n{logs}\ncoordinator:\n{}",
            slimci_tests::tail(&cluster.coordinator.log)
        );
    }
    cluster
}

/// Commits `files` (into `models/`) as pull request `pr` and queues its CI build; returns the
/// run id.
async fn pull_request(cluster: &Cluster, pr: u64, files: &[(&str, String)]) -> RunId {
    // add_model commits everything in the working tree: the other files go in with the last.
    let models = cluster.origin.path.join("models");
    let (last, others) = files.split_last().unwrap();
    for (file, content) in others {
        std::fs::write(models.join(file), content).unwrap();
    }
    let sha = add_model(&cluster.origin, pr, last.0, &last.1).unwrap();
    cluster.create_run(&ci_request(pr, &sha)).await.unwrap().id
}

/// Waits for the run to end; returns it with its stored log.
async fn finish(cluster: &mut Cluster, id: RunId) -> (RunView, String) {
    let run = cluster.wait_for_run(id, RUN_TIMEOUT).await.unwrap();
    let log = cluster.log(id).await.unwrap();
    (run, log)
}

/// The run's message, which it must have.
fn message(run: &RunView) -> &str {
    run.message
        .as_deref()
        .unwrap_or_else(|| panic!("no message in {run:?}"))
}

fn pr_dir(cluster: &Cluster, pr: u64) -> std::path::PathBuf {
    cluster.pr_database(pr).parent().unwrap().to_owned()
}

fn rows(database: &Value, table: &str) -> Vec<String> {
    database[table]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no table {table} in {database}"))
        .iter()
        .map(|row| row.as_str().unwrap().to_owned())
        .collect()
}

async fn wait_for_file(path: &std::path::Path) {
    wait_for(
        &format!("{} to appear", path.display()),
        RUN_TIMEOUT,
        || async { Ok(path.is_file().then_some(())) },
    )
    .await
    .unwrap();
}

/// Case 1 (and the run's sandbox record): the agent's AMQP URL, token and config stay out of
/// dbt's reach, whatever its environment held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_credentials_never_reach_dbt() {
    let mut cluster = hostile_cluster(ClusterOptions {
        agent_env: vec![
            ("SLIMCI_TEST_AMQP_URL".into(), AMQP_URL.into()),
            ("SLIMCI_TEST_AGENT_TOKEN".into(), AGENT_TOKEN.into()),
        ],
        ..options()
    })
    .await;
    let config_file = cluster.agent_config_dir("agent-0").join("agent.toml");
    let agent_pid = cluster.agents[0].pid().to_string();
    let substitutions = [
        ("__CONFIG_FILE__", config_file.to_str().unwrap()),
        ("__AGENT_PID__", agent_pid.as_str()),
    ];
    let id = pull_request(
        &cluster,
        1,
        &[
            ("env_credentials.sql", case("env_credentials.sql", &[])),
            ("env_dump.py", case("env_dump.py", &substitutions)),
        ],
    )
    .await;
    let (run, log) = finish(&mut cluster, id).await;
    assert_eq!(run.status, RunStatus::Success, "{run:?}\n{log}");

    let database = dump_database(&cluster.pr_database(1), None).unwrap();
    assert_eq!(
        rows(&database, "main.env_credentials"),
        ["('unset', 'unset', 'unset')"],
        "env_var() of the agent's credentials finds nothing"
    );
    let dump = rows(&database, "main.env_dump");
    let text = dump.join("\n");
    for secret in [AMQP_URL, AGENT_TOKEN, "guest:guest"] {
        assert!(!text.contains(secret), "dbt saw {secret}:\n{text}");
    }
    for attempt in ["agent config file", "agent environ"] {
        let row = dump.iter().find(|row| row.contains(attempt)).unwrap();
        assert!(row.contains("denied: PermissionError"), "{row}");
    }
    let home = dump.iter().find(|row| row.contains("'env HOME'")).unwrap();
    assert!(
        home.contains("/runs/"),
        "HOME is inside the run directory: {home}"
    );
    let tmpdir = dump
        .iter()
        .find(|row| row.contains("'env TMPDIR'"))
        .unwrap();
    assert!(tmpdir.contains("/runs/"), "{tmpdir}");

    // The run records what protected it.
    let sandbox = sandbox_of(&run);
    assert!(sandbox.pid_namespace, "{sandbox:?}");
    assert_eq!(sandbox.landlock, "full", "{sandbox:?}");
    assert!(sandbox.landlock_abi.unwrap() >= 1, "{sandbox:?}");
    assert!(
        matches!(sandbox.cgroup.as_str(), "v1" | "v2"),
        "{sandbox:?}"
    );
    assert_eq!(sandbox.memory_limit_bytes, Some(4u64 << 30), "{sandbox:?}");
    assert_eq!(sandbox.pids_limit, Some(512), "{sandbox:?}");
    assert_eq!(sandbox.rlimit_nofile, 4096, "{sandbox:?}");
    assert!(!sandbox.core_dumps, "{sandbox:?}");
    if nix::unistd::Uid::effective().is_root() {
        assert_eq!(sandbox.user, "slimci-build", "{sandbox:?}");
        assert_ne!(sandbox.uid, 0, "{sandbox:?}");
    }
    cluster.assert_all_alive();
}

/// Case 2: a daemon that double-forked and called setsid dies when the run ends, and when the
/// run is cancelled in the middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_daemon_dies_with_its_run_and_with_a_cancel() {
    let mut cluster = hostile_cluster(options()).await;
    for (pr, hang) in [(1, false), (2, true)] {
        let marker = marker();
        let _guard = MarkerGuard(marker.clone());
        let pid_file = pr_dir(&cluster, pr).join("daemon.pid");
        let model = case(
            "daemon.py",
            &[
                ("__PID_FILE__", pid_file.to_str().unwrap()),
                ("__MARKER__", &marker),
                ("__HANG__", if hang { "True" } else { "False" }),
            ],
        );
        let id = pull_request(&cluster, pr, &[("daemon.py", model)]).await;
        wait_for_file(&pid_file).await;
        let daemon: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let run = if hang {
            wait_for("the daemon to run", Duration::from_secs(30), || async {
                Ok((!processes_with(&marker).is_empty()).then_some(()))
            })
            .await
            .unwrap();
            // Raw HTTP on purpose: the status itself (202, the cancel is underway) is checked.
            let response = cluster
                .http
                .post(format!("{}/api/v1/runs/{id}/cancel", cluster.url))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            let run = cluster.wait_for_run(id, RUN_TIMEOUT).await.unwrap();
            assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
            run
        } else {
            let run = cluster.wait_for_run(id, RUN_TIMEOUT).await.unwrap();
            assert_eq!(run.status, RunStatus::Success, "{run:?}");
            run
        };
        // The agent reports the end only once the build's cgroup is empty; allow the kernel a
        // moment to finish the daemon's exit.
        assert_gone("the daemon", &[daemon], Duration::from_secs(1))
            .await
            .unwrap_or_else(|error| panic!("{error}; run {run:?}"));
        assert!(
            processes_with(&marker).is_empty(),
            "processes with the marker survived the run"
        );
    }
    cluster.assert_all_alive();
}

/// Case 3: writes to the agent's config directory, /etc and another PR's database are denied,
/// and so is reading the agent's config; the run fails and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_outside_the_build_are_denied() {
    let mut cluster = hostile_cluster(options()).await;
    let other = pull_request(&cluster, 2, &[("harmless.sql", case("harmless.sql", &[]))]).await;
    let other = cluster.wait_for_run(other, RUN_TIMEOUT).await.unwrap();
    assert_eq!(other.status, RunStatus::Success, "{other:?}");
    let other_db = cluster.pr_database(2);
    let other_before = std::fs::read(&other_db).unwrap();

    let config_dir = cluster.agent_config_dir("agent-0");
    let config_file = config_dir.join("agent.toml");
    let model = case(
        "escape.py",
        &[
            ("__CONFIG_DIR__", config_dir.to_str().unwrap()),
            ("__CONFIG_FILE__", config_file.to_str().unwrap()),
            ("__OTHER_DB__", other_db.to_str().unwrap()),
        ],
    );
    let id = pull_request(&cluster, 3, &[("escape.py", model)]).await;
    let (run, log) = finish(&mut cluster, id).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:?}\n{log}");
    // It ran on a pre-started dbt, loaded under rules covering every build of the agent
    // (another PR's database included) and then confined to this build's own.
    assert!(sandbox_of(&run).prestarted, "{run:?}");
    // The run's message names the failing model; its node message and the log say why.
    assert!(message(&run).contains("model.hostile.escape"), "{run:?}");
    let node = nodes_of(&run)
        .iter()
        .find(|node| node.unique_id == "model.hostile.escape")
        .unwrap();
    let message = node.message.as_deref().unwrap();
    for what in [
        "write to the agent's config directory: denied (PermissionError: Permission denied)",
        "write to /etc: denied (PermissionError: Permission denied)",
        "write to another PR's database: denied (PermissionError: Permission denied)",
        "read the agent's config: denied (PermissionError: Permission denied)",
    ] {
        assert!(message.contains(what), "{what} not in: {message}");
        assert!(log.contains(what), "{what} not in the log:\n{log}");
    }
    assert!(!message.contains("ESCAPED"), "{message}");
    assert!(log.contains("sandbox probe:"), "{log}");

    assert!(!config_dir.join("pwned").exists());
    assert!(!std::path::Path::new("/etc/slimci-pwned").exists());
    assert_eq!(
        std::fs::read(&other_db).unwrap(),
        other_before,
        "the other PR's database is unchanged"
    );
    cluster.assert_all_alive();
}

/// Case 4: unbounded memory ends the run as "memory limit", and the agent builds the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_memory_ends_as_memory_limit_and_the_agent_serves_on() {
    let mut cluster = hostile_cluster(ClusterOptions {
        sandbox: format!("grace_secs = {GRACE_SECS}\nmemory_limit = {}", 512 << 20),
        ..options()
    })
    .await;
    let id = pull_request(&cluster, 1, &[("memory.py", case("memory.py", &[]))]).await;
    let (run, log) = finish(&mut cluster, id).await;
    assert_eq!(run.status, RunStatus::Error, "{run:?}\n{log}");
    let message = message(&run);
    assert!(message.starts_with("memory limit:"), "{message}");
    assert!(message.contains("512 MiB"), "{message}");
    assert_eq!(sandbox_of(&run).memory_limit_bytes, Some(512u64 << 20));
    assert!(log.contains("memory limit:"), "{log}");

    let next = pull_request(&cluster, 2, &[("harmless.sql", case("harmless.sql", &[]))]).await;
    let next = cluster.wait_for_run(next, RUN_TIMEOUT).await.unwrap();
    assert_eq!(next.status, RunStatus::Success, "{next:?}");
    cluster.assert_all_alive();
}

/// Case 5: a fork bomb stays within the pids limit; the agent and the machine stay responsive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_bounded() {
    const PIDS_LIMIT: u64 = 64;
    let mut cluster = hostile_cluster(ClusterOptions {
        sandbox: format!("grace_secs = {GRACE_SECS}\npids_limit = {PIDS_LIMIT}"),
        // The bomb's processes never stop by themselves: dbt may not finish with them
        // holding every pid, and then the timeout ends the run, killing a tree that forks.
        run_timeout_secs: Some(40),
        ..options()
    })
    .await;
    let started = pr_dir(&cluster, 1).join("bombing");
    let model = case(
        "fork_bomb.py",
        &[("__STARTED_FILE__", started.to_str().unwrap())],
    );
    let id = pull_request(&cluster, 1, &[("fork_bomb.py", model)]).await;
    wait_for_file(&started).await;

    // While it bombs: the build never holds more tasks than its limit, this machine still
    // starts processes, and the coordinator still answers.
    let mut highest = 0;
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_secs(3) {
        if let Some(current) = build_pids_current(&id.to_string()) {
            highest = highest.max(current);
            assert!(current <= PIDS_LIMIT, "{current} tasks");
        }
        let spawned = Instant::now();
        let status = std::process::Command::new("true").status().unwrap();
        assert!(status.success());
        assert!(spawned.elapsed() < Duration::from_secs(2));
        let asked = Instant::now();
        let health = cluster
            .http
            .get(format!("{}/healthz", cluster.url))
            .send()
            .await
            .unwrap();
        assert!(health.status().is_success());
        assert!(asked.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("fork bomb: at most {highest} tasks in the build's cgroup (limit {PIDS_LIMIT})");

    let (run, log) = finish(&mut cluster, id).await;
    assert_ne!(run.status, RunStatus::Success, "{run:?}\n{log}");
    eprintln!(
        "fork bomb: the run ended {} after {:?} s",
        run.status, run.duration_s
    );
    assert!(
        log.contains(&format!(
            "pids limit: the build hit its limit of {PIDS_LIMIT} processes"
        )),
        "{log}"
    );
    assert!(message(&run).contains("pids limit"), "{run:?}");
    assert_eq!(
        build_pids_current(&id.to_string()),
        None,
        "the build's cgroup is gone"
    );

    let next = pull_request(&cluster, 2, &[("harmless.sql", case("harmless.sql", &[]))]).await;
    let next = cluster.wait_for_run(next, RUN_TIMEOUT).await.unwrap();
    assert_eq!(next.status, RunStatus::Success, "{next:?}");
    cluster.assert_all_alive();
}

/// Case 6: a model sleeping past the run timeout ends as timed out within grace + 2 s, and
/// leaves nothing behind (dbt and its child ignore SIGTERM: the grace period runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_past_its_timeout_ends_as_timed_out() {
    const TIMEOUT_SECS: u64 = 30;
    let mut cluster = hostile_cluster(ClusterOptions {
        run_timeout_secs: Some(TIMEOUT_SECS),
        ..options()
    })
    .await;
    let marker = marker();
    let _guard = MarkerGuard(marker.clone());
    let started = pr_dir(&cluster, 1).join("sleeping");
    let model = case(
        "sleep.py",
        &[
            ("__MARKER__", &marker),
            ("__STARTED_FILE__", started.to_str().unwrap()),
        ],
    );
    let id = pull_request(&cluster, 1, &[("sleep.py", model)]).await;
    wait_for_file(&started).await;
    assert!(!processes_with(&marker).is_empty(), "the child runs");
    let (run, log) = finish(&mut cluster, id).await;
    assert_eq!(run.status, RunStatus::TimedOut, "{run:?}\n{log}");
    let duration = run.duration_s.unwrap();
    eprintln!(
        "timeout: the run took {duration:.2} s for a timeout of {TIMEOUT_SECS} s (grace {GRACE_SECS} s): {:.2} s past the deadline",
        duration - TIMEOUT_SECS as f64
    );
    assert!(
        duration >= (TIMEOUT_SECS + GRACE_SECS) as f64,
        "SIGTERM is ignored, so only the SIGKILL after the grace period ends it: {duration}"
    );
    assert!(
        duration <= (TIMEOUT_SECS + GRACE_SECS + 2) as f64,
        "ended {duration} s after its start"
    );
    assert!(
        message(&run).contains(&format!("exceeded the run timeout of {TIMEOUT_SECS} s")),
        "{run:?}"
    );
    assert!(processes_with(&marker).is_empty(), "leftovers");
    cluster.assert_all_alive();
}

/// Case 7: warehouse secrets reach dbt (only those its profile uses), and whatever prints them
/// leaves `[redacted]` in the stored log, also when a value is cut across two batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_printed_by_a_model_are_redacted() {
    const PROXY: &str = "proxy-password-7f3c9d2e1a";
    const PEM: &str = "-----BEGIN TEST KEY-----\\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\\n-----END TEST KEY-----";
    const UNUSED: &str = "unused-secret-value-4b8e";
    let mut cluster = hostile_cluster(ClusterOptions {
        warehouse_extra: format!(
            r#"
[warehouse.secrets.proxy]
value = "{PROXY}"
setting = "http_proxy_password"

[warehouse.secrets.pem]
value = "{PEM}"
setting = "http_proxy_username"

[warehouse.secrets.unused]
value = "{UNUSED}"
"#
        ),
        ..options()
    })
    .await;
    let id = pull_request(&cluster, 1, &[("secret.py", case("secret.py", &[]))]).await;
    let (run, log) = finish(&mut cluster, id).await;
    assert_eq!(run.status, RunStatus::Success, "{run:?}\n{log}");

    let pem = PEM.replace("\\n", "\n");
    assert!(log.contains("whole secret: [redacted]"), "{log}");
    assert!(log.contains("split secret: [redacted] (end)"), "{log}");
    assert!(log.contains("multi-line secret:"), "{log}");
    assert!(!log.contains(PROXY), "{log}");
    assert!(
        !log.contains(&PROXY[..5]) || !log.contains(&PROXY[5..]),
        "{log}"
    );
    for line in pem.lines() {
        assert!(!log.contains(line), "{line} in:\n{log}");
    }
    let after_header = log.split("multi-line secret:").nth(1).unwrap();
    assert!(
        after_header.trim_start().starts_with("[redacted]"),
        "{after_header}"
    );

    // dbt had the secrets its profile uses, and only those.
    let sha = |text: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    };
    let database = dump_database(&cluster.pr_database(1), None).unwrap();
    let seen = rows(&database, "main.secret");
    assert!(
        seen.contains(&format!("('proxy', '{}')", sha(PROXY))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&format!("('pem', '{}')", sha(&pem))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"('unused_present', 'False')".to_owned()),
        "{seen:?}"
    );
    cluster.assert_all_alive();
}

/// Case 8: `slimci cancel` during a build ends it as cancelled within grace + 2 s, with no
/// process left (dbt and its child ignore SIGTERM: the grace period runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_the_cli_stops_the_build_within_the_grace_period() {
    let mut cluster = hostile_cluster(options()).await;
    let marker = marker();
    let _guard = MarkerGuard(marker.clone());
    let started = pr_dir(&cluster, 1).join("sleeping");
    let model = case(
        "sleep.py",
        &[
            ("__MARKER__", &marker),
            ("__STARTED_FILE__", started.to_str().unwrap()),
        ],
    );
    let id = pull_request(&cluster, 1, &[("sleep.py", model)]).await;
    wait_for_file(&started).await;
    let cancelled_at = Instant::now();
    let output = cluster.run_cli(&["cancel", &id.to_string()]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run = cluster.wait_for_run(id, RUN_TIMEOUT).await.unwrap();
    let elapsed = cancelled_at.elapsed();
    eprintln!("cancel: the run ended {elapsed:.2?} after `slimci cancel` (grace {GRACE_SECS} s)");
    assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
    assert!(
        elapsed >= Duration::from_secs(GRACE_SECS),
        "SIGTERM is ignored, so only the SIGKILL after the grace period ends it: {elapsed:?}"
    );
    assert!(
        elapsed <= Duration::from_secs(GRACE_SECS + 2),
        "cancelled after {elapsed:?}"
    );
    assert!(processes_with(&marker).is_empty(), "leftovers");
    cluster.assert_all_alive();
}

/// If the agent itself dies (SIGKILL, no chance to clean up), its build dies with it: the
/// parent-death signal takes the wrapper, and with it the build's PID namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_takes_its_build_with_it() {
    let cluster = hostile_cluster(options()).await;
    let marker = marker();
    let _guard = MarkerGuard(marker.clone());
    let started = pr_dir(&cluster, 1).join("sleeping");
    let model = case(
        "sleep.py",
        &[
            ("__MARKER__", &marker),
            ("__STARTED_FILE__", started.to_str().unwrap()),
        ],
    );
    pull_request(&cluster, 1, &[("sleep.py", model)]).await;
    wait_for_file(&started).await;
    let build = processes_with(&marker);
    assert!(!build.is_empty(), "the build runs");
    cluster.agents[0].signal(nix::sys::signal::Signal::SIGKILL);
    assert_gone(
        "the build of a killed agent",
        &build,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(processes_with(&marker).is_empty(), "leftovers");
}
