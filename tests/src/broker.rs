//! A RabbitMQ node of the test's own, from the machine's `rabbitmq-server`, so fault tests can
//! stop and restart the broker, and set a short consumer timeout through its config file,
//! without disturbing the shared broker other tests use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{command_dying_with_test, spawn};
use crate::wait_for;

/// `rabbitmqctl -n <node> <verb>`, given at most a minute (it waits for the node otherwise).
fn rabbitmqctl(node: &str, verb: &str) -> Command {
    let mut command = Command::new("timeout");
    command.args(["60", "rabbitmqctl", "-n", node, verb]);
    command
}

pub struct PrivateBroker {
    dir: tempfile::TempDir,
    pub port: u16,
    node: String,
    server: Option<Child>,
}

fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl PrivateBroker {
    /// Starts a node whose consumer timeout is `consumer_timeout_ms`.
    pub async fn start(consumer_timeout_ms: u64) -> anyhow::Result<PrivateBroker> {
        let dir = tempfile::Builder::new()
            .prefix("slimci-rabbit-")
            .tempdir()?;
        // The distribution port is the AMQP port + 20000; both must be free.
        let seed = (uuid::Uuid::new_v4().as_u128() % 3000) as u16;
        let port = (0..3000u16)
            .map(|offset| 6000 + (seed + offset) % 3000)
            .find(|&port| free(port) && free(port + 20000))
            .context("no free port pair for a private RabbitMQ node")?;
        std::fs::create_dir_all(dir.path().join("mnesia"))?;
        std::fs::create_dir_all(dir.path().join("log"))?;
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = {port}\nconsumer_timeout = {consumer_timeout_ms}\nloopback_users = none\n"
            ),
        )?;
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n")?;
        // rabbitmq-server drops to the `rabbitmq` user when started as root.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir.path())
            .status();
        let _ = Command::new("chmod").arg("755").arg(dir.path()).status();
        let node = format!("slimci-test-{port}@localhost");
        let mut broker = PrivateBroker {
            dir,
            port,
            node,
            server: None,
        };
        broker.spawn().await?;
        Ok(broker)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The URL of `user` in the default vhost.
    pub fn url_of(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/%2f", self.port)
    }

    /// Adds `user` with RabbitMQ's configure, write and read patterns in the default vhost.
    pub fn add_user(
        &self,
        user: &str,
        password: &str,
        [configure, write, read]: [&str; 3],
    ) -> anyhow::Result<()> {
        for args in [
            vec!["add_user", user, password],
            vec!["set_permissions", "-p", "/", user, configure, write, read],
        ] {
            let output = rabbitmqctl(&self.node, args[0]).args(&args[1..]).output()?;
            if !output.status.success() {
                bail!(
                    "rabbitmqctl {}: {}",
                    args[0],
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("server.log"))?;
        let mut command = command_dying_with_test(Path::new("rabbitmq-server"));
        command
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", (self.port + 20000).to_string())
            .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.path("log"))
            .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.path("enabled_plugins"),
            )
            .env("RABBITMQ_FEATURE_FLAGS_FILE", self.path("feature_flags"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", self.path("plugins-expand"))
            .env("RABBITMQ_PID_FILE", self.path("rabbit.pid"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let server =
            spawn(command).context("starting rabbitmq-server (apt-get install rabbitmq-server)")?;
        self.server = Some(server);
        let url = self.url();
        wait_for(
            "the private RabbitMQ node to accept connections",
            Duration::from_secs(60),
            || async {
                // A node still booting can take the TCP connection and not answer the AMQP
                // handshake: give each attempt 3 s and try again, rather than let one hung
                // attempt use up the whole wait (it did once, under load).
                let attempt = tokio::time::timeout(
                    Duration::from_secs(3),
                    lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
                );
                Ok(attempt.await.ok().and_then(Result::ok).map(|_| ()))
            },
        )
        .await
        .with_context(|| std::fs::read_to_string(self.path("server.log")).unwrap_or_default())
    }

    /// Stops the node gracefully (as an operator would for an upgrade).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        let status = rabbitmqctl(&self.node, "stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !status.is_ok_and(|status| status.success()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(server.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = server.wait();
        if free(self.port) {
            Ok(())
        } else {
            bail!("the private RabbitMQ node still holds port {}", self.port)
        }
    }

    /// Stops and starts the node; durable queues and persistent messages survive.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn().await
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            let _ = rabbitmqctl(&self.node, "stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(server.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.wait();
        }
    }
}
