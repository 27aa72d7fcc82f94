//! A coordinator, its agents and a git origin in one temporary directory, driven over the
//! coordinator's HTTP API and the `slimci` CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::binaries::{binary, dbt, reachable_copy};
use crate::origin::Origin;
use crate::process::{Process, check_watched, tail};
use crate::wait::wait_for;
use crate::{AGENT_TOKEN, AMQP_URL, github};

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
    /// The agents' `[warehouse]` keys instead of a DuckDB warehouse under the cluster's
    /// directory (e.g. `postgres::Postgres::agent_warehouse`).
    pub warehouse: Option<String>,
    /// TOML after the agents' `[warehouse]` keys (e.g. `[warehouse.secrets.x]` tables).
    pub warehouse_extra: String,
    /// Extra environment of the agent processes.
    pub agent_env: Vec<(String, String)>,
    /// A broker other than the shared one (a `broker::PrivateBroker`). The test inspects the
    /// queues with it, and the processes use it unless given their own below.
    pub amqp_url: Option<String>,
    /// The coordinator's and the agents' own URLs (their own broker users).
    pub coordinator_amqp_url: Option<String>,
    pub agent_amqp_url: Option<String>,
    /// A dbt other than `SLIMCI_DBT` (the stub, for fault and load tests).
    pub dbt: Option<PathBuf>,
    /// TOML tables appended to the agents' configuration (`[telemetry]`, ...).
    pub agent_toml: String,
    /// The coordinator's `auth.api_token` (none: the user API is open); the cluster's `client`
    /// presents it, its plain `http` does not.
    pub api_token: Option<String>,
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
            warehouse: None,
            warehouse_extra: String::new(),
            agent_env: Vec::new(),
            amqp_url: None,
            coordinator_amqp_url: None,
            agent_amqp_url: None,
            dbt: None,
            agent_toml: String::new(),
            api_token: None,
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
    /// What the agents connect with: `amqp_url` unless the options gave them their own.
    agent_amqp_url: String,
    dbt: PathBuf,
    restarts: usize,
    agent_sandbox: String,
    agent_warehouse: Option<String>,
    agent_warehouse_extra: String,
    agent_env: Vec<(String, String)>,
    agent_toml: String,
    api_token: Option<String>,
    pub prefix: String,
    pub origin: Origin,
    pub url: String,
    pub coordinator: Process,
    pub agents: Vec<Process>,
    /// The user API, typed (`api.rs` wraps it for the tests).
    pub client: slimci_client::Client,
    /// Plain HTTP with the same deadlines, for what is not the user API (webhooks, agent
    /// routes, `/healthz`) and for requests that are wrong on purpose.
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
        let amqp_url = options
            .amqp_url
            .clone()
            .unwrap_or_else(|| AMQP_URL.to_owned());
        if options.amqp_url.is_none() && !listening("127.0.0.1:5672") {
            bail!(
                "RabbitMQ is not listening on 127.0.0.1:5672: run scripts/e2e (or scripts/test), which installs and starts it"
            );
        }
        // The build user runs dbt: a stub from `target/` may be out of its reach (a checkout
        // under /root), so it gets a copy in the cluster's directory.
        let dbt = match &options.dbt {
            Some(program) => reachable_copy(program, &dir.path().join("bin"))?,
            None => dbt(),
        };
        let prefix = format!("slimci-test-{}", uuid::Uuid::new_v4().simple());
        let origin = match &options.project {
            Some(project) => Origin::create_from(project, dir.path().join("origin"))?,
            None => Origin::create(dir.path().join("origin"))?,
        };
        write_coordinator_config(dir.path(), &prefix, &origin.path, &options)?;
        let coordinator = start_coordinator(dir.path(), "coordinator")?;
        let url = wait_for_address(dir.path(), &coordinator).await?;
        let agent_amqp_url = options
            .agent_amqp_url
            .clone()
            .unwrap_or_else(|| amqp_url.clone());
        let mut cluster = Cluster {
            dir,
            amqp_url,
            agent_amqp_url,
            dbt,
            restarts: 0,
            agent_sandbox: options.sandbox,
            agent_warehouse: options.warehouse,
            agent_warehouse_extra: options.warehouse_extra,
            agent_env: options.agent_env,
            agent_toml: options.agent_toml,
            api_token: options.api_token.clone(),
            prefix,
            origin,
            url: url.clone(),
            coordinator,
            agents: Vec::new(),
            client: user_api(&url, options.api_token.as_deref()),
            http: http_client(),
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
{warehouse}
{warehouse_extra}

[sandbox]
{sandbox}

{agent_toml}
"#,
                agent_toml = self.agent_toml,
                warehouse_extra = self.agent_warehouse_extra,
                sandbox = self.agent_sandbox,
                work = dir.join(name).display(),
                dbt = self.dbt.display(),
                amqp_url = self.agent_amqp_url,
                prefix = self.prefix,
                url = self.url,
                warehouse = self.agent_warehouse.clone().unwrap_or_else(|| format!(
                    "type = \"duckdb\"\nroot = \"{}\"\nthreads = 4",
                    self.warehouse().display()
                )),
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
        self.agents[index].signal_process(nix::sys::signal::Signal::SIGKILL);
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
        self.stop_coordinator();
        self.start_coordinator_again().await
    }

    /// Stops the coordinator (SIGTERM, then SIGKILL after 10 s); `start_coordinator_again`
    /// brings it back where the agents expect it.
    pub fn stop_coordinator(&mut self) {
        self.coordinator.stop(Duration::from_secs(10));
    }

    /// Starts the coordinator stopped by `stop_coordinator` on its data directory and address.
    pub async fn start_coordinator_again(&mut self) -> anyhow::Result<()> {
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
        self.client = user_api(&self.url, self.api_token.as_deref());
        Ok(())
    }

    pub fn assert_all_alive(&mut self) {
        self.coordinator.assert_alive();
        for agent in &mut self.agents {
            agent.assert_alive();
        }
    }

    /// Runs the `slimci` CLI with `args` against this cluster. Panics, naming the command, if
    /// it has not ended within `CLI_DEADLINE`, or at once when a process of the cluster died
    /// meanwhile (the CLI is killed then).
    pub async fn run_cli(&self, args: &[&str]) -> std::process::Output {
        let mut command = tokio::process::Command::from(self.cli());
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().expect("run slimci");
        let output = child.wait_with_output();
        let deadline = tokio::time::sleep(CLI_DEADLINE);
        tokio::pin!(output, deadline);
        loop {
            tokio::select! {
                output = &mut output => return output.expect("the output of slimci"),
                _ = &mut deadline => panic!(
                    "`slimci {}` did not end within {CLI_DEADLINE:?}; coordinator log:\n{}",
                    args.join(" "),
                    tail(&self.coordinator.log)
                ),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Err(died) = check_watched() {
                        panic!("while `slimci {}` ran: {died:#}", args.join(" "));
                    }
                }
            }
        }
    }

    pub fn cli(&self) -> Command {
        let mut command = Command::new(binary("slimci"));
        command
            .env("SLIMCI_COORDINATOR", &self.url)
            .stdin(Stdio::null());
        command
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
        Ok(self.queue_counts(queue).await?.0)
    }

    /// Consumers of one of this cluster's queues.
    pub async fn queue_consumers(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(self.queue_counts(queue).await?.1)
    }

    /// Messages waiting in one of this cluster's queues, and its consumers.
    async fn queue_counts(&self, queue: &str) -> anyhow::Result<(u32, u32)> {
        let queue = format!("{}.{queue}", self.prefix);
        let count = async {
            let connection =
                lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                    .await?;
            let channel = connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            let _ = connection.close(200, "bye".into()).await;
            anyhow::Ok((declared.message_count(), declared.consumer_count()))
        };
        tokio::time::timeout(BROKER_DEADLINE, count)
            .await
            .with_context(|| {
                format!("counting {queue}: the broker did not answer in {BROKER_DEADLINE:?}")
            })?
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
        // Bounded: a broker that does not answer must not hold the test up.
        let prefix = self.prefix.clone();
        let amqp_url = self.amqp_url.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let cleanup = async move {
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
            };
            runtime
                .block_on(async { tokio::time::timeout(BROKER_DEADLINE, cleanup).await })
                .ok()?;
            done.send(()).ok()
        });
        let _ = finished.recv_timeout(BROKER_DEADLINE + Duration::from_secs(1));
    }
}

/// How long a `slimci` command run by a test may take.
const CLI_DEADLINE: Duration = Duration::from_secs(300);

/// How long the harness waits for one conversation with RabbitMQ.
const BROKER_DEADLINE: Duration = Duration::from_secs(15);

/// The harness's HTTP client: every request has a deadline, so a coordinator that stopped
/// answering fails the test instead of hanging it.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}

/// The typed user API of the coordinator at `url`, on the harness's deadlines.
fn user_api(url: &str, api_token: Option<&str>) -> slimci_client::Client {
    slimci_client::Client::with_http(url, api_token.map(str::to_owned), http_client())
}

fn listening(address: &str) -> bool {
    address
        .parse()
        .ok()
        .and_then(|address| {
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()
        })
        .is_some()
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
{api_token}

[[repository]]
name = "shop"
clone_url = "{origin}"
production_branch = "main"
{timeout}
{repository_toml}
{coordinator_toml}
"#,
            data = dir.join("coordinator").display(),
            amqp_url = options
                .coordinator_amqp_url
                .as_deref()
                .or(options.amqp_url.as_deref())
                .unwrap_or(AMQP_URL),
            origin = origin.display(),
            timeout = options
                .run_timeout_secs
                .map(|secs| format!("run_timeout_secs = {secs}"))
                .unwrap_or_default(),
            repository_toml = options.repository_toml,
            coordinator_toml = options.coordinator_toml,
            api_token = options
                .api_token
                .as_ref()
                .map(|token| format!("api_token = \"{token}\""))
                .unwrap_or_default(),
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
    let client = http_client();
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
