//! A PostgreSQL server of a test's own: Debian's `initdb` and `postgres` (version 15), run as
//! the `postgres` user on a free port of 127.0.0.1, in a directory of its own, with a
//! password-protected superuser `slimci`. The server is a harness `Process`: it dies with the
//! test, and a wait fails at once, naming it, if it dies first. Needs root (to become
//! `postgres`).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::free_port;
use crate::process::Process;
use crate::wait::wait_for;

/// Where Debian's PostgreSQL 15 programs are.
const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser the agent logs in as, and its password.
pub const USER: &str = "slimci";
pub const PASSWORD: &str = "e2e-postgres-password";

pub struct Postgres {
    pub port: u16,
    /// Holds the data directory, the socket and the log.
    dir: tempfile::TempDir,
    _server: Process,
}

fn as_postgres(program: &str) -> Command {
    let mut command = Command::new("/usr/bin/setpriv");
    command
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(Path::new(BIN).join(program));
    command
}

fn chown_to_postgres(path: &Path) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()?;
    if !status.success() {
        bail!("chown postgres {} failed", path.display());
    }
    Ok(())
}

impl Postgres {
    /// Initialises a cluster and starts its server; about 2 s.
    pub async fn start() -> anyhow::Result<Postgres> {
        if !Path::new(BIN).join("initdb").is_file() {
            bail!(
                "PostgreSQL 15 is not installed ({BIN}/initdb is missing); scripts/e2e installs it"
            );
        }
        let dir = tempfile::Builder::new().prefix("slimci-pg-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let data = dir.path().join("data");
        let socket = dir.path().join("socket");
        for directory in [&data, &socket] {
            std::fs::create_dir(directory)?;
            chown_to_postgres(directory)?;
        }
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, PASSWORD)?;
        chown_to_postgres(&password_file)?;
        let output = as_postgres("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", password_file.display()))
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let port = free_port()?;
        let port_text = port.to_string();
        let server = Process::start(
            "postgres",
            Path::new("/usr/bin/setpriv"),
            &[
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--pdeathsig=KILL",
                "--",
                &format!("{BIN}/postgres"),
                "-D",
                data.to_str().expect("utf-8 path"),
                "-p",
                &port_text,
                "-k",
                socket.to_str().expect("utf-8 path"),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                // Each session's application_name in the log, for the tests to read.
                "-c",
                "log_connections=on",
            ],
            dir.path().join("postgres.log"),
        )?;
        let postgres = Postgres {
            port,
            dir,
            _server: server,
        };
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || async { Ok(postgres.query("postgres", "select 1").ok().map(drop)) },
        )
        .await?;
        Ok(postgres)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Runs `sql` in `database` over TCP with the password, as the agent's dbt connects; the
    /// rows, one per line, columns separated by `|`.
    pub fn query(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new(Path::new(BIN).join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .context("running psql")?;
        if !output.status.success() {
            bail!(
                "psql `{sql}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        self.query("postgres", &format!("create database {name}"))
            .map(drop)
    }

    /// The schemas of `database` that are not PostgreSQL's own.
    pub fn schemas(&self, database: &str) -> anyhow::Result<BTreeSet<String>> {
        Ok(self
            .query(
                database,
                "select schema_name from information_schema.schemata \
                 where schema_name not like 'pg_%' and schema_name not in ('information_schema', 'public')",
            )?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The tables and views of `schema` in `database`.
    pub fn relations(&self, database: &str, schema: &str) -> anyhow::Result<BTreeSet<String>> {
        Ok(self
            .query(
                database,
                &format!(
                    "select table_name from information_schema.tables where table_schema = '{schema}'"
                ),
            )?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The agents' `[warehouse]` keys for this server (`ClusterOptions::warehouse`).
    pub fn agent_warehouse(&self) -> String {
        format!(
            "type = \"postgres\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\nsslmode = \"disable\"\nthreads = 4",
            self.port
        )
    }
}
