//! Harness for the end-to-end tests: starts the real `slimci-coordinator` and `slimci-agent`
//! binaries against the RabbitMQ on 127.0.0.1:5672 (under a queue prefix of the test's own),
//! real dbt (`SLIMCI_DBT`, set by `scripts/test`), and a git repository of the example project
//! made for the test. Each process logs to its own file in the test's directory; dropping the
//! cluster kills every process group it started and deletes its queues.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

pub mod broker;
pub mod github;
pub mod measure;
pub mod storm;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const AGENT_TOKEN: &str = "e2e-agent-token-0123456789";

/// Where cargo put the workspace's binaries (the test executable lives in `<dir>/deps`).
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in `target/<profile>/deps`, binaries like `slimci-faults` beside
    // the others in `target/<profile>`.
    let exe = std::env::current_exe().expect("test executable path");
    let beside = exe.parent().expect("executable directory");
    let candidates = [
        beside.join(name),
        beside
            .parent()
            .map(|dir| dir.join(name))
            .unwrap_or_default(),
    ];
    let path = candidates.iter().find(|path| path.is_file()).cloned();
    path.unwrap_or_else(|| {
        panic!("{name} is missing beside {}: run `cargo build --workspace --bins` first (scripts/test does)", exe.display())
    })
}

pub fn dbt() -> PathBuf {
    let path = PathBuf::from(std::env::var("SLIMCI_DBT").expect(
        "SLIMCI_DBT must name the dbt executable; run the tests through scripts/test, which installs dbt",
    ));
    assert!(
        path.is_file(),
        "SLIMCI_DBT={} does not exist",
        path.display()
    );
    path
}

/// The Python of dbt's virtualenv, which has the duckdb module.
pub fn python() -> PathBuf {
    dbt().with_file_name("python")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process started by the harness, in its own process group.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    fn start(name: &str, program: &Path, args: &[&str], log: PathBuf) -> anyhow::Result<Process> {
        Process::start_with_env(name, program, args, log, &[])
    }

    fn start_with_env(
        name: &str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        env: &[(String, String)],
    ) -> anyhow::Result<Process> {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::create(&log)?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(key, value)| (key, value)))
            .env("RUST_LOG", "info,lapin=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Process {
            name: name.to_owned(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the process to exit (after a signal).
    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }

    /// Fails if the process has exited: nothing here is meant to exit on its own.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited unexpectedly ({status}); log:\n{}",
                self.name,
                tail(&self.log)
            );
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL the whole group.
    pub fn stop(&mut self, grace: Duration) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=slimci-test",
            "-c",
            "user.email=test@example.com",
        ])
        .args(args)
        .current_dir(dir)
        .output()?;
    if !output.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// A git repository of `examples/shop`, with `main` and pull-request refs made on demand.
pub struct Origin {
    pub path: PathBuf,
}

impl Origin {
    pub fn create(path: PathBuf) -> anyhow::Result<Origin> {
        Origin::create_from(&workspace_root().join("examples/shop"), path)
    }

    /// A git repository of the dbt project in `project`.
    pub fn create_from(project: &Path, path: PathBuf) -> anyhow::Result<Origin> {
        let status = Command::new("cp")
            .arg("-r")
            .arg(project)
            .arg(&path)
            .status()?;
        if !status.success() {
            bail!("copying {} failed", project.display());
        }
        git(&path, &["init", "-q", "-b", "main"])?;
        git(&path, &["add", "."])?;
        git(&path, &["commit", "-qm", "Shop project"])?;
        Ok(Origin { path })
    }

    pub fn main_sha(&self) -> anyhow::Result<String> {
        git(&self.path, &["rev-parse", "main"])
    }

    /// Writes `file` on main and commits it; returns the new head.
    pub fn commit_file_on_main(&self, file: &str, content: &str) -> anyhow::Result<String> {
        std::fs::write(self.path.join(file), content)?;
        git(&self.path, &["add", file])?;
        git(&self.path, &["commit", "-qm", &format!("Change {file}")])?;
        self.main_sha()
    }

    /// Points `refs/pull/<pr>/head` at an existing commit.
    pub fn point_pull_request(&self, pr: u64, sha: &str) -> anyhow::Result<()> {
        git(
            &self.path,
            &["update-ref", &format!("refs/pull/{pr}/head"), sha],
        )?;
        Ok(())
    }

    /// Commits `edits` ((file, old text, new text)) on top of main as pull request `pr`, points
    /// `refs/pull/<pr>/head` at it, and returns its SHA. Main is left as it was.
    pub fn pull_request(&self, pr: u64, edits: &[(&str, &str, &str)]) -> anyhow::Result<String> {
        let branch = format!("pr-{pr}-{}", uuid::Uuid::new_v4().simple());
        git(&self.path, &["checkout", "-qb", &branch, "main"])?;
        for (file, old, new) in edits {
            let path = self.path.join(file);
            let text = std::fs::read_to_string(&path)?;
            if !text.contains(old) {
                bail!("{file} does not contain {old:?}");
            }
            std::fs::write(&path, text.replacen(old, new, 1))?;
        }
        git(&self.path, &["commit", "-qam", &format!("PR {pr}")])?;
        let sha = git(&self.path, &["rev-parse", "HEAD"])?;
        git(
            &self.path,
            &["update-ref", &format!("refs/pull/{pr}/head"), &sha],
        )?;
        git(&self.path, &["checkout", "-q", "main"])?;
        git(&self.path, &["branch", "-qD", &branch])?;
        Ok(sha)
    }
}

/// The edits of `examples/shop/README.md`, all to `models/staging/stg_orders.sql`.
pub mod sandbox;

pub mod edits {
    pub const FILE: &str = "models/staging/stg_orders.sql";
    /// Adds a column; every test still passes.
    pub const ADD_COLUMN: (&str, &str, &str) = (
        FILE,
        "        cast(order_date as date) as order_date,",
        "        cast(order_date as date) as order_date,\n        dayname(order_date) as order_day_of_week,",
    );
    /// Upper-cases the status, which the `accepted_values` test rejects.
    pub const FAIL_TEST: (&str, &str, &str) =
        (FILE, "lower(status) as status", "upper(status) as status");
    /// A change that keeps every test passing, for a second commit of one PR.
    pub const RESPACE: (&str, &str, &str) =
        (FILE, "lower(status) as status", "lower(status)  as status");
    /// A syntax error.
    pub const BAD_SQL: (&str, &str, &str) =
        (FILE, "lower(status) as status", "lower(status as status");
}

pub struct ClusterOptions {
    pub agents: usize,
    pub slots: u16,
    /// TOML tables appended to the coordinator's configuration (`[github]`, `[sweeper]`, ...).
    pub coordinator_toml: String,
    /// TOML keys added to the `shop` repository's `[[repository]]` table.
    pub repository_toml: String,
    /// The dbt project of the `shop` repository (default: examples/shop).
    pub project: Option<PathBuf>,
    /// The repository's `run_timeout_secs`.
    pub run_timeout_secs: Option<u64>,
    /// Lines of the agents' `[sandbox]` table.
    pub sandbox: String,
    /// TOML after the agents' `[warehouse]` keys (e.g. `[warehouse.secrets.x]` tables).
    pub warehouse_extra: String,
    /// Extra environment of the agent processes.
    pub agent_env: Vec<(String, String)>,
    /// A broker other than the shared one (a `broker::PrivateBroker`).
    pub amqp_url: Option<String>,
    /// A dbt other than `SLIMCI_DBT` (the stub, for fault and load tests).
    pub dbt: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            agents: 1,
            slots: 1,
            coordinator_toml: String::new(),
            repository_toml: String::new(),
            project: None,
            run_timeout_secs: None,
            sandbox: "grace_secs = 5".to_owned(),
            warehouse_extra: String::new(),
            agent_env: Vec::new(),
            amqp_url: None,
            dbt: None,
        }
    }
}

/// The webhook secret the GitHub tests configure.
pub const WEBHOOK_SECRET: &str = "e2e-webhook-secret";

/// A coordinator, its agents and a git origin, all in one temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The broker this cluster uses (the shared one, or a private node).
    pub amqp_url: String,
    dbt: PathBuf,
    restarts: usize,
    agent_sandbox: String,
    agent_warehouse_extra: String,
    agent_env: Vec<(String, String)>,
    pub prefix: String,
    pub origin: Origin,
    pub url: String,
    pub coordinator: Process,
    pub agents: Vec<Process>,
    pub http: reqwest::Client,
}

impl Cluster {
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("slimci-e2e-").tempdir()?;
        // The agents' build user must reach their work directories and the warehouse.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let prefix = format!("slimci-test-{}", uuid::Uuid::new_v4().simple());
        let origin = match &options.project {
            Some(project) => Origin::create_from(project, dir.path().join("origin"))?,
            None => Origin::create(dir.path().join("origin"))?,
        };
        write_coordinator_config(dir.path(), &prefix, &origin.path, &options)?;
        let coordinator = start_coordinator(dir.path(), "coordinator")?;
        let url = wait_for_address(dir.path(), &coordinator).await?;
        let mut cluster = Cluster {
            dir,
            amqp_url: options
                .amqp_url
                .clone()
                .unwrap_or_else(|| AMQP_URL.to_owned()),
            dbt: options.dbt.clone().unwrap_or_else(dbt),
            restarts: 0,
            agent_sandbox: options.sandbox,
            agent_warehouse_extra: options.warehouse_extra,
            agent_env: options.agent_env,
            prefix,
            origin,
            url,
            coordinator,
            agents: Vec::new(),
            http: reqwest::Client::new(),
        };
        // Ready means the coordinator has declared its queues, so tests may count messages.
        wait_for(
            "the coordinator to declare its queues",
            Duration::from_secs(30),
            || async { Ok(cluster.queue_depth("jobs").await.ok().map(|_| ())) },
        )
        .await?;
        for index in 0..options.agents {
            cluster.start_agent(&format!("agent-{index}"), options.slots)?;
        }
        Ok(cluster)
    }

    pub fn start_agent(&mut self, name: &str, slots: u16) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let config = self.agent_config_dir(name).join("agent.toml");
        std::fs::create_dir_all(self.agent_config_dir(name))?;
        std::fs::write(
            &config,
            format!(
                r#"name = "{name}"
slots = {slots}
work_dir = "{work}"
dbt = "{dbt}"

[amqp]
url = "{amqp_url}"
prefix = "{prefix}"

[coordinator]
url = "{url}"
token = "{AGENT_TOKEN}"

[warehouse]
type = "duckdb"
root = "{warehouse}"
threads = 4
{warehouse_extra}

[sandbox]
{sandbox}
"#,
                warehouse_extra = self.agent_warehouse_extra,
                sandbox = self.agent_sandbox,
                work = dir.join(name).display(),
                dbt = self.dbt.display(),
                amqp_url = self.amqp_url,
                prefix = self.prefix,
                url = self.url,
                warehouse = self.warehouse().display(),
            ),
        )?;
        let process = Process::start_with_env(
            name,
            &binary("slimci-agent"),
            &["--config", config.to_str().expect("utf-8 path")],
            dir.join(format!("{name}.log")),
            &self.agent_env,
        )?;
        self.agents.push(process);
        Ok(())
    }

    /// Kills agent `index` with SIGKILL (the process only, as when its VM vanishes; its builds
    /// die through the parent-death signal).
    pub fn kill_agent(&mut self, index: usize) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.agents[index].pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        self.agents[index].wait();
    }

    /// Starts agent `index` again with its configuration (after `kill_agent`).
    pub fn restart_agent(&mut self, index: usize) -> anyhow::Result<()> {
        let name = self.agents[index].name.clone();
        self.restarts += 1;
        let config = self.agent_config_dir(&name).join("agent.toml");
        let process = Process::start_with_env(
            &name,
            &binary("slimci-agent"),
            &["--config", config.to_str().expect("utf-8 path")],
            self.dir
                .path()
                .join(format!("{name}.restart-{}.log", self.restarts)),
            &self.agent_env,
        )?;
        self.agents[index] = process;
        Ok(())
    }

    /// Agent `index`'s `work_dir` (its caches and run directories).
    pub fn agent_work_dir(&self, index: usize) -> PathBuf {
        self.dir.path().join(&self.agents[index].name)
    }

    /// The directory of an agent's configuration file (hidden from its builds).
    pub fn agent_config_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-config"))
    }

    pub fn warehouse(&self) -> PathBuf {
        self.dir.path().join("warehouse")
    }

    pub fn production_database(&self) -> PathBuf {
        self.warehouse().join("shop/current/prod.duckdb")
    }

    pub fn pr_database(&self, pr: u64) -> PathBuf {
        self.warehouse()
            .join(format!("shop/pr/pr_shop_{pr}/pr.duckdb"))
    }

    /// Stops the coordinator and starts it again on the same data directory.
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        self.coordinator.stop(Duration::from_secs(10));
        let _ = std::fs::remove_file(self.dir.path().join("coordinator/http.addr"));
        // Listen where the agents expect the coordinator to be.
        let address = self.url.trim_start_matches("http://").to_owned();
        let config = self.dir.path().join("coordinator.toml");
        let text = std::fs::read_to_string(&config)?.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{address}\""),
        );
        std::fs::write(&config, text)?;
        self.coordinator = start_coordinator(self.dir.path(), "coordinator-restarted")?;
        self.url = wait_for_address(self.dir.path(), &self.coordinator).await?;
        Ok(())
    }

    pub fn assert_all_alive(&mut self) {
        self.coordinator.assert_alive();
        for agent in &mut self.agents {
            agent.assert_alive();
        }
    }

    /// Runs the `slimci` CLI with `args` against this cluster, off the async runtime.
    pub async fn run_cli(&self, args: &[&str]) -> std::process::Output {
        let mut command = self.cli();
        command.args(args);
        tokio::task::spawn_blocking(move || command.output().expect("run slimci"))
            .await
            .expect("the CLI task")
    }

    pub fn cli(&self) -> Command {
        let mut command = Command::new(binary("slimci"));
        command
            .env("SLIMCI_COORDINATOR", &self.url)
            .stdin(Stdio::null());
        command
    }

    pub async fn post_run(&self, body: Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}/api/v1/runs", self.url))
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    pub async fn run(&self, id: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1/runs/{id}", self.url))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET run {id}: HTTP {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// `GET /api/v1/repositories/shop/production-state`.
    pub async fn production_state(&self) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!(
                "{}/api/v1/repositories/shop/production-state",
                self.url
            ))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "production state: HTTP {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    pub async fn runs(&self) -> anyhow::Result<Vec<Value>> {
        let response = self
            .http
            .get(format!("{}/api/v1/runs?limit=1000", self.url))
            .send()
            .await?;
        Ok(response.json().await?)
    }

    pub async fn log(&self, id: &str) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/api/v1/runs/{id}/logs", self.url))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits until the run is terminal and returns it.
    pub async fn wait_for_run(&mut self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let result = wait_for(&format!("run {id} to end"), timeout, || async {
            let run = self.run(id).await?;
            Ok((!matches!(run["status"].as_str(), Some("queued" | "running"))).then_some(run))
        })
        .await;
        if result.is_err() {
            self.assert_all_alive();
            eprintln!("coordinator log:\n{}", tail(&self.coordinator.log));
            for agent in &self.agents {
                eprintln!("{} log:\n{}", agent.name, tail(&agent.log));
            }
        }
        result
    }

    /// Deploys main and waits for it to succeed; returns the run.
    pub async fn deploy(&mut self) -> anyhow::Result<Value> {
        let (status, run) = self
            .post_run(serde_json::json!({ "repository": "shop", "kind": "deploy" }))
            .await?;
        anyhow::ensure!(
            status == 201,
            "deploy request answered {status}: {run}\ncoordinator log:\n{}",
            tail(&self.coordinator.log)
        );
        let run = self
            .wait_for_run(
                run["id"].as_str().unwrap_or_default(),
                Duration::from_secs(180),
            )
            .await?;
        anyhow::ensure!(
            run["status"] == "success",
            "deploy ended {}: {}",
            run["status"],
            run["message"]
        );
        Ok(run)
    }

    /// Posts a GitHub webhook, signed with `secret` (or unsigned when none); returns the status
    /// and the JSON answer.
    pub async fn webhook(
        &self,
        event: &str,
        delivery: &str,
        payload: &Value,
        secret: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = serde_json::to_vec(payload)?;
        let mut request = self
            .http
            .post(format!("{}/webhooks/github", self.url))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("user-agent", "GitHub-Hookshot/e2e");
        if let Some(secret) = secret {
            request = request.header("x-hub-signature-256", github::sign(secret, &body));
        }
        let response = request.body(body).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Messages waiting in one of this cluster's queues.
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let connection =
            lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                .await?;
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                format!("{}.{queue}", self.prefix).as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        let _ = connection.close(200, "bye".into()).await;
        Ok(declared.message_count())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.signal(nix::sys::signal::Signal::SIGKILL);
        }
        self.coordinator.signal(nix::sys::signal::Signal::SIGKILL);
        // Delete this test's queues and exchanges, on a thread of its own: we may be inside a
        // runtime here.
        let prefix = self.prefix.clone();
        let amqp_url = self.amqp_url.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let connection =
                    lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default())
                        .await
                        .ok()?;
                let channel = connection.create_channel().await.ok()?;
                for queue in ["jobs", "events", "jobs.dead", "events.dead"] {
                    let _ = channel
                        .queue_delete(
                            format!("{prefix}.{queue}").as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
                for exchange in ["control", "dead-letter"] {
                    let _ = channel
                        .exchange_delete(
                            format!("{prefix}.{exchange}").as_str().into(),
                            lapin::options::ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
                let _ = connection.close(200, "bye".into()).await;
                Some(())
            })
        })
        .join();
    }
}

fn write_coordinator_config(
    dir: &Path,
    prefix: &str,
    origin: &Path,
    options: &ClusterOptions,
) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("coordinator.toml"),
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "{data}"

[amqp]
url = "{amqp_url}"
prefix = "{prefix}"

[auth]
agent_token = "{AGENT_TOKEN}"

[[repository]]
name = "shop"
clone_url = "{origin}"
production_branch = "main"
{timeout}
{repository_toml}
{coordinator_toml}
"#,
            data = dir.join("coordinator").display(),
            amqp_url = options.amqp_url.as_deref().unwrap_or(AMQP_URL),
            origin = origin.display(),
            timeout = options
                .run_timeout_secs
                .map(|secs| format!("run_timeout_secs = {secs}"))
                .unwrap_or_default(),
            repository_toml = options.repository_toml,
            coordinator_toml = options.coordinator_toml,
        ),
    )?;
    Ok(())
}

fn start_coordinator(dir: &Path, name: &str) -> anyhow::Result<Process> {
    let config = dir.join("coordinator.toml");
    Process::start(
        name,
        &binary("slimci-coordinator"),
        &["--config", config.to_str().expect("utf-8 path")],
        dir.join(format!("{name}.log")),
    )
}

async fn wait_for_address(dir: &Path, coordinator: &Process) -> anyhow::Result<String> {
    let file = dir.join("coordinator/http.addr");
    let address = wait_for(
        "the coordinator to listen",
        Duration::from_secs(30),
        || async {
            Ok(std::fs::read_to_string(&file)
                .ok()
                .map(|text| text.trim().to_owned())
                .filter(|text| !text.is_empty()))
        },
    )
    .await
    .with_context(|| tail(&coordinator.log))?;
    let url = format!("http://{address}");
    let client = reqwest::Client::new();
    wait_for(
        "the coordinator to answer",
        Duration::from_secs(30),
        || async {
            Ok(client
                .get(format!("{url}/healthz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        },
    )
    .await?;
    Ok(url)
}

/// A file the stub dbt can append its records to from inside the sandbox (which lets builds
/// write their own directories and /dev only): `/dev/shm/slimci-records-<uuid>.jsonl`,
/// world-writable. The caller removes it.
pub fn record_file() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = PathBuf::from(format!(
        "/dev/shm/slimci-records-{}.jsonl",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, b"").expect("create the record file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .expect("open the record file to the build user");
    path
}

/// The stub dbt's records (`record` in `slimci_stub.json`): for each run id, the
/// [first, last] millisecond of every attempt's build, from its start, proofs of life and end.
pub fn attempt_spans(record: &Path) -> std::collections::HashMap<String, Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    let mut by_attempt: std::collections::HashMap<String, (u64, u64)> =
        std::collections::HashMap::new();
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let run_dir = entry["run_dir"].as_str().unwrap_or_default().to_owned();
        let ms = entry["ms"].as_u64().unwrap_or_default();
        let span = by_attempt.entry(run_dir).or_insert((ms, ms));
        span.0 = span.0.min(ms);
        span.1 = span.1.max(ms);
    }
    let mut by_run: std::collections::HashMap<String, Vec<(u64, u64)>> =
        std::collections::HashMap::new();
    for (run_dir, span) in by_attempt {
        // Run directories are `<work>/runs/<run id>-<attempt>`.
        let name = Path::new(&run_dir)
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
            .to_owned();
        let run = name
            .rsplit_once('-')
            .map(|(run, _)| run.to_owned())
            .unwrap_or(name);
        by_run.entry(run).or_default().push(span);
    }
    by_run
}

/// Bytes of the files under `path` (symlinks not followed).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !metadata.is_dir() {
        return metadata.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| disk_usage(&entry.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Reads every table and view of a DuckDB database (attaching production as `prod`, as the PR
/// profile does) through dbt's own Python: `{ "schema.name": [rows as text] }`.
pub fn dump_database(database: &Path, production: Option<&Path>) -> anyhow::Result<Value> {
    let script = r#"
import json, sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
if len(sys.argv) > 2:
    con.execute(f"ATTACH '{sys.argv[2]}' AS prod (READ_ONLY)")
catalog = con.execute("select current_database()").fetchone()[0]
out = {}
for schema, name, kind in con.execute(
    "select table_schema, table_name, table_type from information_schema.tables where table_catalog = ? order by 1, 2", [catalog]
).fetchall():
    rows = con.execute(f'select * from "{schema}"."{name}"').fetchall()
    columns = [d[0] for d in con.description]
    out[f"{schema}.{name}"] = {"kind": kind, "columns": columns, "rows": sorted(repr(r) for r in rows)}
print(json.dumps(out))
"#;
    let mut command = Command::new(python());
    command.arg("-c").arg(script).arg(database);
    if let Some(production) = production {
        command.arg(production);
    }
    let output = command.output()?;
    if !output.status.success() {
        bail!(
            "reading {}: {}",
            database.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}
