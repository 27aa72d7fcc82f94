//! The write guard of a CI build (`slimci_guard.py`): before anything executes, every selected
//! node that writes a relation must land inside the PR's isolation, or the build is refused,
//! naming the nodes, where they would have gone and what to fix. DuckDB: the PR's own database
//! (catalog `pr`). A server warehouse: the PR's schema `pr_<slug>_<n>` or a `pr_<slug>_<n>_*`
//! schema of the CI database, compared case-insensitively (Snowflake folds unquoted names).
//! It runs in dbt's own process (cold, or on the pre-started dbt), on the manifest dbt parsed
//! once: the guard adds a node listing to the build, not a second parse.
//!
//! The same script opens the build's first warehouse connection on PostgreSQL and Snowflake,
//! before parsing (`BuildChecks::connect`, for deploys too): its `connected` line ends the run's
//! profile step, and a wrong key, role or host fails the run there with the adapter's words.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::warehouse::{DuckDbTarget, PR_CATALOG, Purpose, SchemaTarget, Target, Warehouse};

/// The guard script, written beside the pre-started dbt's worker (which imports it).
pub const GUARD_SCRIPT: &str = include_str!("../slimci_guard.py");
/// The exit code of a refused build.
pub const REFUSED_EXIT: i32 = 3;
/// The exit code of a build whose first connection failed.
pub const NOT_CONNECTED_EXIT: i32 = 4;
/// The start of the lines the script prints about itself (not part of the log).
pub const GUARD_PREFIX: &str = "[slimci-guard] ";

/// What the script says on a `GUARD_PREFIX` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardLine {
    /// The build's first connection worked.
    Connected,
    /// It did not: the adapter's words.
    ConnectionError(String),
    /// The write guard refused the build: the run's message.
    Refused(String),
}

/// What the script checks around a `dbt build`: nothing (plain dbt), or the first connection,
/// the write guard, or both.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildChecks<'a> {
    pub guard: Option<&'a WriteGuard>,
    /// Open one connection before parsing (server warehouses).
    pub connect: bool,
}

impl BuildChecks<'_> {
    pub fn any(&self) -> bool {
        self.guard.is_some() || self.connect
    }

    /// The script's input for `dbt build` with `build` (its arguments, `build` first): the
    /// connection check, dbt's parse, the listing of what `build` selects (only with a guard),
    /// and the build.
    pub fn script_input(&self, build: &[String]) -> serde_json::Value {
        let mut common: Vec<String> = Vec::new();
        let mut select: Vec<String> = Vec::new();
        let mut args = build.iter().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--target" | "--log-format" => {
                    common.push(arg.clone());
                    common.extend(args.next().cloned());
                }
                "--select" | "--state" | "--exclude" | "--selector" => {
                    select.push(arg.clone());
                    select.extend(args.next().cloned());
                }
                _ => {}
            }
        }
        let parse: Vec<String> = std::iter::once("parse".to_owned())
            .chain(common.iter().cloned())
            .collect();
        let target: Vec<String> = common
            .chunks(2)
            .filter(|pair| pair[0] == "--target")
            .flatten()
            .cloned()
            .collect();
        let connect: Option<Vec<String>> = self.connect.then(|| {
            ["debug", "--connection"]
                .map(str::to_owned)
                .into_iter()
                .chain(target.iter().cloned())
                .chain(["--log-level", "none"].map(str::to_owned))
                .collect()
        });
        let list: Option<Vec<String>> = self.guard.map(|_| {
            std::iter::once("ls".to_owned())
                .chain(target.iter().cloned())
                .chain(select.iter().cloned())
                .chain(
                    [
                        "--resource-types",
                        "model",
                        "seed",
                        "snapshot",
                        "--output",
                        "json",
                        "--output-keys",
                        "unique_id",
                        "--log-level",
                        "none",
                    ]
                    .map(str::to_owned),
                )
                .collect()
        });
        let guard = self.guard;
        serde_json::json!({
            "connect": connect,
            "parse": parse,
            "list": list,
            "build": build,
            "database": guard.map(|guard| &guard.database),
            "schema": guard.and_then(|guard| guard.schema.as_ref()),
            "case_insensitive": guard.is_some_and(|guard| guard.case_insensitive),
            "max_identifier": guard.and_then(|guard| guard.max_identifier),
        })
    }

    /// What a `GUARD_PREFIX` line (its text after the prefix) says; None for a line it does not
    /// know.
    pub fn read_line(&self, line: &str) -> Option<GuardLine> {
        let fields: serde_json::Value = serde_json::from_str(line).ok()?;
        if fields.get("connected").is_some() {
            return Some(GuardLine::Connected);
        }
        if let Some(error) = fields.get("connection_error") {
            let error = error.as_str().unwrap_or("the connection failed").to_owned();
            return Some(GuardLine::ConnectionError(error));
        }
        let guard = self.guard?;
        fields
            .get("refused")
            .map(|_| GuardLine::Refused(guard.refusal(line)))
    }
}

/// Where the guard script is and the Python that runs it (dbt's own).
#[derive(Clone)]
pub struct GuardScript {
    pub python: PathBuf,
    pub script: PathBuf,
}

impl GuardScript {
    /// Writes the script into `directory` (the pre-started dbt's, `<work_dir>/dbt-worker`).
    pub fn install(python: PathBuf, directory: &Path) -> std::io::Result<GuardScript> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(directory)?;
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755))?;
        // Agents before this one wrote the worker as `dbt_worker.py`; dbt imports every
        // top-level `dbt_*` module on its path as a plugin, and this directory is on it.
        let _ = std::fs::remove_file(directory.join("dbt_worker.py"));
        let script = directory.join("slimci_guard.py");
        std::fs::write(&script, GUARD_SCRIPT)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))?;
        Ok(GuardScript { python, script })
    }
}

/// What a CI build may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteGuard {
    pub database: String,
    /// The isolation schema; none where the database itself is the PR's (DuckDB).
    pub schema: Option<String>,
    pub case_insensitive: bool,
    /// The longest schema name the warehouse keeps whole (PostgreSQL cuts at 63 bytes).
    pub max_identifier: Option<usize>,
}

impl WriteGuard {
    /// The guard of a CI build's target on `warehouse`; none for a deploy or a teardown.
    pub fn for_target(warehouse: &Warehouse, target: &Target) -> Option<WriteGuard> {
        match target {
            Target::DuckDb(DuckDbTarget::Ci { .. }) => Some(WriteGuard {
                database: PR_CATALOG.to_owned(),
                schema: None,
                case_insensitive: false,
                max_identifier: None,
            }),
            Target::Schema(SchemaTarget {
                purpose: Purpose::Ci,
                database,
                schema,
                ..
            }) => Some(WriteGuard {
                database: database.clone(),
                schema: Some(schema.clone()),
                case_insensitive: true,
                max_identifier: warehouse.max_identifier(),
            }),
            Target::DuckDb(_) | Target::Schema(_) => None,
        }
    }

    /// The run's message for the guard's `[slimci-guard]` line.
    pub fn refusal(&self, line: &str) -> String {
        #[derive(Deserialize)]
        struct Report {
            refused: Vec<Refused>,
        }
        #[derive(Deserialize)]
        struct Refused {
            node: String,
            database: Option<String>,
            schema: Option<String>,
            reason: Option<String>,
        }
        let report: Option<Report> = serde_json::from_str(line).ok();
        let nodes = report
            .map(|report| {
                report
                    .refused
                    .iter()
                    .map(|refused| {
                        let place = format!(
                            "{} → {}.{}",
                            refused.node,
                            refused.database.as_deref().unwrap_or("?"),
                            refused.schema.as_deref().unwrap_or("?")
                        );
                        match &refused.reason {
                            Some(reason) => format!("{place} ({reason})"),
                            None => place,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let count = nodes.len();
        match &self.schema {
            Some(schema) => format!(
                "refused before building: {count} node(s) would be written outside this PR's schemas {db}.{schema} and {db}.{schema}_*, or under a name the warehouse would cut: {}. A PR's build may write only there; make the project's generate_schema_name build on target.schema (dbt's default does), set no `database` on models, and keep custom schema names short",
                nodes.join(", "),
                db = self.database,
            ),
            None => format!(
                "refused before building: {count} node(s) would be written outside this PR's own database `{}`: {}. Set no `database` on models",
                self.database,
                nodes.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_gets_the_builds_selection_and_target() {
        let guard = WriteGuard {
            database: "analytics".into(),
            schema: Some("pr_shop_7".into()),
            case_insensitive: true,
            max_identifier: Some(63),
        };
        let build: Vec<String> = [
            "build",
            "--select",
            "state:modified+",
            "--defer",
            "--state",
            "/s",
            "--target",
            "ci",
            "--log-format",
            "json",
        ]
        .map(str::to_owned)
        .to_vec();
        let checks = BuildChecks {
            guard: Some(&guard),
            connect: false,
        };
        let input = checks.script_input(&build);
        assert_eq!(
            input["parse"],
            serde_json::json!(["parse", "--target", "ci", "--log-format", "json"])
        );
        let list: Vec<String> = serde_json::from_value(input["list"].clone()).unwrap();
        assert_eq!(
            &list[..7],
            [
                "ls",
                "--target",
                "ci",
                "--select",
                "state:modified+",
                "--state",
                "/s"
            ]
        );
        assert!(!list.contains(&"--defer".to_owned()));
        assert_eq!(input["build"], serde_json::json!(build));
        assert_eq!(input["schema"], "pr_shop_7");
        assert_eq!(input["max_identifier"], 63);
        assert_eq!(input["connect"], serde_json::Value::Null);

        // A deploy on a server warehouse: the connection first, no node check.
        let deploy = BuildChecks {
            guard: None,
            connect: true,
        }
        .script_input(&["build".into(), "--target".into(), "prod".into()]);
        assert_eq!(
            deploy["connect"],
            serde_json::json!([
                "debug",
                "--connection",
                "--target",
                "prod",
                "--log-level",
                "none"
            ])
        );
        assert_eq!(deploy["list"], serde_json::Value::Null);
        assert_eq!(
            deploy["parse"],
            serde_json::json!(["parse", "--target", "prod"])
        );
    }

    #[test]
    fn the_scripts_lines_are_read_by_what_they_say() {
        let guard = WriteGuard {
            database: "analytics".into(),
            schema: Some("pr_shop_7".into()),
            case_insensitive: true,
            max_identifier: Some(63),
        };
        let checks = BuildChecks {
            guard: Some(&guard),
            connect: true,
        };
        assert_eq!(
            checks.read_line(r#"{"connected": true}"#),
            Some(GuardLine::Connected)
        );
        assert_eq!(
            checks.read_line(r#"{"connection_error": "password authentication failed"}"#),
            Some(GuardLine::ConnectionError(
                "password authentication failed".into()
            ))
        );
        let refused = checks
            .read_line(r#"{"refused": [{"node": "model.shop.orders", "database": "analytics", "schema": "analytics"}]}"#);
        assert!(
            matches!(&refused, Some(GuardLine::Refused(message)) if message.contains("model.shop.orders")),
            "{refused:?}"
        );
        assert_eq!(checks.read_line("not json"), None);
    }

    #[test]
    fn a_refusal_names_each_node_and_where_it_would_have_gone() {
        let guard = WriteGuard {
            database: "analytics".into(),
            schema: Some("pr_shop_7".into()),
            case_insensitive: true,
            max_identifier: Some(63),
        };
        let long = guard.refusal(
            r#"{"refused": [{"node": "model.shop.x", "database": "analytics", "schema": "pr_shop_7_a_very_long_custom_schema", "reason": "a schema name longer than 63 bytes, which the warehouse would cut"}]}"#,
        );
        assert!(
            long.contains("(a schema name longer than 63 bytes"),
            "{long}"
        );
        let message = guard.refusal(
            r#"{"refused": [{"node": "model.shop.orders", "database": "analytics", "schema": "analytics"}]}"#,
        );
        assert!(
            message.contains(
                "1 node(s) would be written outside this PR's schemas analytics.pr_shop_7"
            ),
            "{message}"
        );
        assert!(
            message.contains("model.shop.orders → analytics.analytics"),
            "{message}"
        );
        assert!(message.contains("generate_schema_name"), "{message}");
    }
}
