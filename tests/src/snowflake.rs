//! A Snowflake of a test's own: the `fakesnow` emulator in server mode, started through
//! `tests/fixtures/fakesnow/serve.py` (which patches what the emulator gets wrong; see its
//! README) under dbt's Python, on a free port of 127.0.0.1. The server is a harness `Process`:
//! it dies with the test. What it proves and what it does not: `tests/fixtures/fakesnow/README.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::binaries::{python, workspace_root};
use crate::free_port;
use crate::process::Process;
use crate::wait::wait_for;

pub struct Fakesnow {
    pub port: u16,
    dir: tempfile::TempDir,
    _server: Process,
}

impl Fakesnow {
    pub async fn start() -> anyhow::Result<Fakesnow> {
        let dir = tempfile::Builder::new()
            .prefix("slimci-fakesnow-")
            .tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("fakesnow.log");
        let server = Process::start(
            "fakesnow",
            &python(),
            &[
                workspace_root()
                    .join("tests/fixtures/fakesnow/serve.py")
                    .to_str()
                    .expect("utf-8 path"),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ],
            log.clone(),
        )?;
        let fakesnow = Fakesnow {
            port,
            dir,
            _server: server,
        };
        wait_for(
            "the Snowflake emulator to listen",
            Duration::from_secs(60),
            || async {
                Ok(std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("fakesnow listening")
                    .then_some(()))
            },
        )
        .await?;
        Ok(fakesnow)
    }

    /// The server's log: each login with its `query_tag`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("fakesnow.log")).unwrap_or_default()
    }

    /// A new RSA private key (unencrypted PKCS#8 PEM) in the server's directory, for the
    /// agent's key-pair authentication.
    pub fn private_key(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("slimci_key.p8");
        let output = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .output()
            .context("running openssl")?;
        if !output.status.success() {
            bail!(
                "openssl genpkey: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(path)
    }

    /// Runs `sql` with the Snowflake connector; the rows as JSON arrays of strings.
    pub fn query(&self, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        let script = r#"
import json, sys, snowflake.connector
connection = snowflake.connector.connect(account="fakesnow", user="fake", password="snow",
    host="127.0.0.1", port=int(sys.argv[1]), protocol="http", login_timeout=20)
rows = connection.cursor().execute(sys.argv[2]).fetchall()
print(json.dumps([[str(value) for value in row] for row in rows]))
connection.close()
"#;
        let output = Command::new(python())
            .args(["-c", script, &self.port.to_string(), sql])
            .env("SNOWFLAKE_DISABLE_PLATFORM_DETECTION", "true")
            .output()
            .context("running the Snowflake connector")?;
        if !output.status.success() {
            bail!(
                "`{sql}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// The schemas of `database`, upper-cased as Snowflake shows unquoted names.
    pub fn schemas(&self, database: &str) -> anyhow::Result<std::collections::BTreeSet<String>> {
        // `show terse schemas`: created_on, name, kind, database_name, schema_name.
        Ok(self
            .query(&format!("show terse schemas in database {database}"))?
            .into_iter()
            .map(|row| row[1].to_ascii_uppercase())
            .filter(|name| !matches!(name.as_str(), "INFORMATION_SCHEMA" | "PUBLIC" | "MAIN"))
            .collect())
    }

    /// The agents' `[warehouse]` keys for this server, with key-pair authentication by `key`.
    pub fn agent_warehouse(&self, key: &Path) -> String {
        format!(
            "type = \"snowflake\"\naccount = \"fakesnow\"\nuser = \"fake\"\nrole = \"TRANSFORMER\"\nwarehouse = \"COMPUTE_WH\"\nprivate_key_path = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nprotocol = \"http\"\nthreads = 4",
            key.display(),
            self.port
        )
    }
}
