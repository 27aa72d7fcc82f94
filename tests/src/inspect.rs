//! Looking at what a build left behind: the stub dbt's records, disk usage, and the contents
//! of a DuckDB database.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;
use serde_json::Value;

use crate::binaries::python;
use crate::measure::run_of_run_dir;

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
        by_run
            .entry(run_of_run_dir(&run_dir))
            .or_default()
            .push(span);
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
