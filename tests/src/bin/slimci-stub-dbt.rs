//! A stand-in for the dbt CLI, for load and fault tests: it takes the arguments the agent
//! passes (`build`, `deps`, `parse`, `run-operation`, `--log-format json`, ...), prints
//! dbt-shaped JSON log lines, writes `run_results.json` and `manifest.json` into
//! `DBT_TARGET_PATH` (`parse`: a stand-in `partial_parse.msgpack`), and exits like dbt (0, 1, 2). SIGTERM ends it at once with 130, as dbt does on an interrupt.
//!
//! Its behaviour comes from `slimci_stub.json` in the project directory (the current
//! directory), committed with the test project so each commit can behave differently:
//! `{"duration_ms": 500, "exit_code": 0, "nodes": 3, "log_lines": 10, "line_bytes": 0,
//!   "log_bytes": 0, "invalid_utf8": false, "record": "/path/attempts.jsonl"}`.
//! `record` names a file to which it appends `{"run_dir", "event": "start"|"end", "ms"}` lines,
//! so a test can check from the agents' own side that attempts of a run never overlapped.
//! `line_interval_ms` (for `bench/perf`'s log latency): the `log_lines` lines come that many
//! milliseconds apart, each flushed at once and ending `at_ms=<wall-clock ms>`; with
//! `blank_lines`, each is followed by a blank line (as dbt prints around its summaries).
//! Every result has dbt's `thread_id` and `timing`, the nodes spread over `threads` threads
//! (default 1) across `duration_ms`; `failing_test` adds a test that fails with that message,
//! and `deferred` makes the first model depend on that many models the build does not select.

use std::io::Write;
use std::time::{Duration, Instant};

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Stub {
    duration_ms: u64,
    exit_code: i32,
    nodes: u32,
    log_lines: u32,
    /// One extra line of this many bytes.
    line_bytes: usize,
    /// This many more bytes of log, in 1 KiB lines.
    log_bytes: u64,
    invalid_utf8: bool,
    record: Option<String>,
    /// Print the log lines this far apart, each with its wall-clock time (`at_ms=`).
    line_interval_ms: u64,
    /// With `line_interval_ms`: a blank line after each log line.
    blank_lines: bool,
    /// dbt threads the nodes are spread over in `run_results.json` (0 counts as 1).
    threads: u32,
    /// A test `test.stub.not_null_m0_id` that fails with this message.
    failing_test: Option<String>,
    /// Parents of `model.stub.m0` outside the selection (what `--defer` reads from production).
    deferred: u32,
}

/// The wall clock in Unix ms. (Not `slimci_tests::measure::now_ms`: the stub stays off the
/// harness library, which would make it five times larger, because it is started in every build.)
fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn log(out: &mut impl Write, name: &str, msg: &str, data: serde_json::Value) {
    let line = serde_json::json!({
        "data": data,
        "info": { "name": name, "level": "info", "msg": msg, "ts": chrono::Utc::now().to_rfc3339(), "code": "", "category": "", "extra": {}, "invocation_id": "stub", "pid": std::process::id(), "thread": "MainThread" },
    });
    let _ = writeln!(out, "{line}");
}

fn record(stub: &Stub, event: &str) {
    let Some(path) = &stub.record else { return };
    let run_dir = std::env::var("DBT_TARGET_PATH").unwrap_or_default();
    let run_dir = run_dir.trim_end_matches("/target").to_owned();
    let line = serde_json::json!({ "run_dir": run_dir, "event": event, "ms": now_ms() as u64, "pid": std::process::id() });
    // One write(2) per record: several builds append to this file at once, and a line written
    // in pieces (as `writeln!` of a JSON value does, token by token) interleaves with theirs
    // into records that mix one build's time with another's directory.
    let line = format!("{line}\n");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

/// What `dbt parse` leaves for partial parsing: a stand-in `partial_parse.msgpack` in
/// `--target-path` (else `DBT_TARGET_PATH`), so a deploy has a parse to publish.
fn write_parse(args: &[String]) {
    let target = args
        .iter()
        .position(|arg| arg == "--target-path")
        .and_then(|at| args.get(at + 1).cloned())
        .or_else(|| std::env::var("DBT_TARGET_PATH").ok());
    if let Some(target) = target {
        let _ = std::fs::create_dir_all(&target);
        let _ = std::fs::write(
            std::path::Path::new(&target).join("partial_parse.msgpack"),
            b"stub parse",
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().cloned().unwrap_or_default();
    let stub: Stub = std::fs::read_to_string("slimci_stub.json")
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Stub {
            nodes: 3,
            log_lines: 5,
            ..Stub::default()
        });
    let terminated = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _ = signal_hook_lite(terminated.clone());
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    log(
        &mut out,
        "MainReportVersion",
        "Running with dbt=stub",
        serde_json::json!({ "version": "stub" }),
    );
    if command == "parse" {
        write_parse(&args);
    }
    if command != "build" {
        let _ = out.flush();
        return;
    }
    record(&stub, "start");
    create_target_database();
    log(
        &mut out,
        "ConcurrencyLine",
        "Concurrency: 1 threads",
        serde_json::json!({ "node_count": stub.nodes }),
    );
    for line in 0..stub.log_lines {
        if stub.line_interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(stub.line_interval_ms));
            if terminated.load(std::sync::atomic::Ordering::SeqCst) {
                record(&stub, "end");
                std::process::exit(130);
            }
            log(
                &mut out,
                "Note",
                &format!("stub log line {line} at_ms={}", now_ms()),
                serde_json::json!({}),
            );
            if stub.blank_lines {
                let _ = writeln!(out);
            }
            let _ = out.flush();
            continue;
        }
        log(
            &mut out,
            "Note",
            &format!("stub log line {line}"),
            serde_json::json!({}),
        );
    }
    if stub.line_bytes > 0 {
        let _ = writeln!(out, "{}", "x".repeat(stub.line_bytes));
    }
    if stub.invalid_utf8 {
        let _ = out.write_all(b"invalid \xff\xfe utf-8 \xc3\x28 here\n");
    }
    let chunk = "y".repeat(1023);
    let mut written = 0;
    while written < stub.log_bytes {
        let _ = writeln!(out, "{chunk}");
        written += 1024;
    }
    let _ = out.flush();
    let built_from = chrono::Utc::now();
    let deadline = Instant::now() + Duration::from_millis(stub.duration_ms);
    let mut last_alive = Instant::now();
    while Instant::now() < deadline {
        if terminated.load(std::sync::atomic::Ordering::SeqCst) {
            record(&stub, "end");
            std::process::exit(130);
        }
        if last_alive.elapsed() >= Duration::from_millis(100) {
            // Proof of life, so a test can tell when a killed attempt really stopped.
            record(&stub, "alive");
            last_alive = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut results = Vec::new();
    let mut nodes = serde_json::Map::new();
    // Each thread runs its share of the nodes one after the other across the build's duration.
    let threads = stub.threads.max(1);
    let per_thread = stub.nodes.div_ceil(threads).max(1);
    let slice_ms = (stub.duration_ms / u64::from(per_thread)).max(1) as i64;
    let timing = |index: u32| {
        let start =
            built_from + chrono::Duration::milliseconds(i64::from(index / threads) * slice_ms);
        let end = start + chrono::Duration::milliseconds(slice_ms * 9 / 10);
        let at = |time: chrono::DateTime<chrono::Utc>| {
            time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        (
            format!("Thread-{}", index % threads + 1),
            serde_json::json!([
                { "name": "compile", "started_at": at(start), "completed_at": at(start) },
                { "name": "execute", "started_at": at(start), "completed_at": at(end) },
            ]),
        )
    };
    if let Some(message) = &stub.failing_test {
        let (thread_id, timing) = timing(stub.nodes);
        results.push(serde_json::json!({ "unique_id": "test.stub.not_null_m0_id", "status": "fail", "execution_time": 0.02, "message": message, "failures": 3, "thread_id": thread_id, "timing": timing }));
        nodes.insert(
            "test.stub.not_null_m0_id".to_owned(),
            serde_json::json!({ "depends_on": { "nodes": ["model.stub.m0"] } }),
        );
    }
    for index in 0..stub.nodes {
        let id = format!("model.stub.m{index}");
        let status = if stub.exit_code == 1 && index == 0 {
            "error"
        } else {
            "success"
        };
        log(
            &mut out,
            "LogModelResult",
            &format!(
                "{} of {} OK created sql view model main.m{index}",
                index + 1,
                stub.nodes
            ),
            serde_json::json!({ "index": index + 1, "total": stub.nodes, "status": status }),
        );
        let (thread_id, timing) = timing(index);
        results.push(serde_json::json!({ "unique_id": id, "status": status, "execution_time": 0.01, "message": "OK", "failures": null, "thread_id": thread_id, "timing": timing }));
        let parents: Vec<String> = if index == 0 {
            (0..stub.deferred)
                .map(|parent| format!("model.stub.production_{parent}"))
                .collect()
        } else {
            vec![format!("model.stub.m{}", index - 1)]
        };
        nodes.insert(
            id,
            serde_json::json!({ "depends_on": { "nodes": parents } }),
        );
    }
    let target = std::env::var("DBT_TARGET_PATH").unwrap_or_else(|_| "target".to_owned());
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(
        format!("{target}/run_results.json"),
        serde_json::json!({ "results": results }).to_string(),
    );
    let _ = std::fs::write(
        format!("{target}/manifest.json"),
        serde_json::json!({ "nodes": nodes, "metadata": { "dbt_version": "stub" } }).to_string(),
    );
    log(&mut out, "StatsLine", "Done.", serde_json::json!({}));
    let _ = out.flush();
    record(&stub, "end");
    std::process::exit(stub.exit_code);
}

/// Creates the database file the profile's output points at, as dbt-duckdb would on connect
/// (a deploy's file becomes production, which CI runs later attach).
fn create_target_database() {
    let Ok(directory) = std::env::var("DBT_PROFILES_DIR") else {
        return;
    };
    let Ok(profile) = std::fs::read_to_string(format!("{directory}/profiles.yml")) else {
        return;
    };
    let Some(path) = profile
        .lines()
        .find_map(|line| line.trim().strip_prefix("path: "))
    else {
        return;
    };
    let path = path.trim_matches(|c| c == '"' || c == '\'');
    if !std::path::Path::new(path).exists() {
        let _ = std::fs::write(path, b"");
    }
}

/// SIGTERM sets the flag; the main loop exits with 130.
fn signal_hook_lite(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered here, before returning: a SIGTERM from now on sets the flag.
    let mut terminate = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?
    };
    std::thread::spawn(move || {
        runtime.block_on(async {
            terminate.recv().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
    Ok(())
}
