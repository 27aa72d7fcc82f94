//! PR feedback time on a large project: `bench/run` (defaults: 1,400 models, 5 rounds).
//!
//! Generates a deterministic dbt project (`bench/genproject.py`), deploys it through slimci,
//! then measures, in rounds that alternate their order, a one-line change to `stg_0001` built
//! three ways:
//! - (a) slimci end to end: the run's request accepted to its result recorded (the
//!   coordinator's `created_at` → `finished_at`), on a warm agent;
//! - (b) a careful engineer by hand: `dbt build --select state:modified+ --defer --state ...` in
//!   a checkout where it ran before (its packages and `partial_parse.msgpack` present), timing
//!   the dbt command only;
//! - (c) the do-it-yourself CI script: fresh `git clone`, download the production manifest,
//!   `dbt deps`, then the same `dbt build`.
//!
//! All three run dbt with the same profile shape (DuckDB, 4 threads, the PR's own database with
//! production attached read-only as `prod`). Prints each sample, the medians, the phase
//! breakdown of (a), and last a machine-readable line:
//! `bench warehouse=<duckdb|postgres> n_models=<n> a_s=<median> b_s=<median> c_s=<median>
//! a_over_b=<x> a_over_c=<y>`.
//!
//! `--warehouse postgres` runs the same on a PostgreSQL 15 server the benchmark starts (needs
//! root): slimci's agent, the hand run and the script all build into schemas of one database,
//! deferring to production's schema.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use slimci_client::{RunStatus, RunView};
use slimci_tests::measure::{median, ms_of};
use slimci_tests::postgres::Postgres;
use slimci_tests::{Cluster, ClusterOptions, ci_request, dbt, deploy_request, workspace_root};

#[derive(Parser)]
struct Args {
    /// Models in the generated project.
    #[arg(long, default_value_t = 1400)]
    models: usize,
    /// Rounds of (a), (b) and (c).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seed of the generated project.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where dbt builds.
    #[arg(long, value_enum, default_value_t = WarehouseKind::Duckdb)]
    warehouse: WarehouseKind,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WarehouseKind {
    Duckdb,
    Postgres,
}

impl WarehouseKind {
    fn name(self) -> &'static str {
        match self {
            WarehouseKind::Duckdb => "duckdb",
            WarehouseKind::Postgres => "postgres",
        }
    }
}

/// Where a hand run's or the script's build writes.
enum HandTarget<'a> {
    /// Its own DuckDB file, production attached read-only as `prod`, as the agent does.
    DuckDb {
        database: PathBuf,
        production: &'a Path,
    },
    /// Its own schema of the PostgreSQL database production is in.
    Postgres {
        postgres: &'a Postgres,
        schema: &'a str,
    },
}

const EDITED: &str = "models/staging/stg_0001.sql";
const THREADS: u32 = 4;
const RUN_TIMEOUT: Duration = Duration::from_secs(1800);

fn run(command: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            tail_text(&String::from_utf8_lossy(&output.stdout)),
            tail_text(&String::from_utf8_lossy(&output.stderr))
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn tail_text(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The profile a hand run uses: what the agent writes, with absolute paths.
fn hand_profile(directory: &Path, target: HandTarget<'_>) -> anyhow::Result<()> {
    std::fs::create_dir_all(directory)?;
    let output = match target {
        HandTarget::DuckDb {
            database,
            production,
        } => format!(
            "type: duckdb\n      path: {}\n      threads: {THREADS}\n      attach:\n        - path: {}\n          alias: prod\n          read_only: true\n",
            database.display(),
            production.display()
        ),
        HandTarget::Postgres { postgres, schema } => format!(
            "type: postgres\n      host: 127.0.0.1\n      port: {}\n      user: {}\n      password: {}\n      dbname: {PG_DATABASE}\n      schema: {schema}\n      threads: {THREADS}\n",
            postgres.port,
            slimci_tests::postgres::USER,
            slimci_tests::postgres::PASSWORD,
        ),
    };
    std::fs::write(
        directory.join("profiles.yml"),
        format!("bench:\n  target: ci\n  outputs:\n    ci:\n      {output}"),
    )?;
    Ok(())
}

const PG_DATABASE: &str = "analytics";

/// Seconds from one RFC 3339 time of a run to another (`created_at` to `finished_at`, ...).
fn seconds_between(from: Option<&str>, to: Option<&str>) -> Option<f64> {
    Some((ms_of(to?)? - ms_of(from?)?) as f64 / 1000.0)
}

/// Seconds from the run's request to its result.
fn end_to_end_seconds(run: &RunView) -> f64 {
    seconds_between(Some(&run.created_at), run.finished_at.as_deref()).unwrap_or(f64::NAN)
}

struct Breakdown {
    queue: f64,
    phases: Vec<(String, f64)>,
    startup: f64,
    parse: f64,
    report: f64,
    parse_mode: String,
}

fn breakdown(run: &RunView) -> Breakdown {
    let phases: Vec<(String, f64)> = run
        .phases
        .iter()
        .flatten()
        .map(|phase| (phase.phase.clone(), phase.duration_s.unwrap_or_default()))
        .collect();
    let last_phase_end = run
        .phases
        .iter()
        .flatten()
        .last()
        .and_then(|phase| phase.finished_at.as_deref());
    let report = seconds_between(last_phase_end, run.finished_at.as_deref()).unwrap_or(f64::NAN);
    let caches = run.caches.clone().unwrap_or_default();
    Breakdown {
        queue: seconds_between(Some(&run.created_at), run.started_at.as_deref())
            .unwrap_or(f64::NAN),
        phases,
        startup: caches.dbt_startup_s.unwrap_or(f64::NAN),
        parse: caches.parse_s.unwrap_or(f64::NAN),
        report,
        parse_mode: parse_mode(run).to_owned(),
    }
}

/// How dbt parsed the project in the run (`partial`, `full`, ...; `?` when unknown).
fn parse_mode(run: &RunView) -> &str {
    run.caches
        .as_ref()
        .and_then(|caches| caches.parse.as_deref())
        .unwrap_or("?")
}

struct Bench {
    cluster: Cluster,
    dir: PathBuf,
    state_dir: PathBuf,
    manifest_url: String,
    hand_checkout: PathBuf,
    hand_profiles: PathBuf,
    diy_profiles: PathBuf,
    diy_database: PathBuf,
}

impl Bench {
    fn dbt_command(&self, cwd: &Path, profiles: &Path, state: &Path) -> Command {
        let mut command = Command::new(dbt());
        command
            .args(["build", "--select", "state:modified+", "--defer", "--state"])
            .arg(state)
            .args(["--target", "ci", "--profiles-dir"])
            .arg(profiles)
            .current_dir(cwd)
            .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false");
        command
    }

    /// A new commit of PR 1 changing one line of `stg_0001` to `'<revision>'`.
    fn commit(&self, revision: &str) -> anyhow::Result<String> {
        self.cluster.origin.pull_request(
            1,
            &[(
                EDITED,
                "'r0' as bench_revision",
                &format!("'{revision}' as bench_revision"),
            )],
        )
    }

    async fn slimci(&mut self, sha: &str) -> anyhow::Result<(f64, RunView)> {
        let run = self
            .cluster
            .create_run(&ci_request(1, sha))
            .await
            .context("trigger")?;
        let run = self.cluster.wait_for_run(run.id, RUN_TIMEOUT).await?;
        anyhow::ensure!(run.status == RunStatus::Success, "slimci run: {run:?}");
        Ok((end_to_end_seconds(&run), run))
    }

    fn by_hand(&self, sha: &str) -> anyhow::Result<f64> {
        let checkout = &self.hand_checkout;
        run(
            Command::new("git")
                .args(["fetch", "-q", "origin", "refs/pull/1/head"])
                .current_dir(checkout),
            "git fetch",
        )?;
        run(
            Command::new("git")
                .args(["checkout", "-q", sha])
                .current_dir(checkout),
            "git checkout",
        )?;
        let started = Instant::now();
        run(
            &mut self.dbt_command(checkout, &self.hand_profiles, &self.state_dir),
            "dbt build by hand",
        )?;
        Ok(started.elapsed().as_secs_f64())
    }

    fn diy(&self, round: usize, sha: &str) -> anyhow::Result<f64> {
        let work = self.dir.join(format!("diy-{round}"));
        let _ = std::fs::remove_dir_all(&work);
        let _ = std::fs::remove_file(&self.diy_database);
        std::fs::create_dir_all(&work)?;
        let script = format!(
            r#"set -euo pipefail
cd "{work}"
git clone -q --no-checkout "file://{origin}" repo
cd repo
git fetch -q --depth 1 origin refs/pull/1/head
git checkout -q {sha}
mkdir -p ../state
curl -fsS -o ../state/manifest.json "{manifest_url}"
"{dbt}" deps --profiles-dir "{profiles}" >/dev/null
"{dbt}" build --select state:modified+ --defer --state ../state --target ci --profiles-dir "{profiles}" >/dev/null
"#,
            work = work.display(),
            origin = self.cluster.origin.path.display(),
            manifest_url = self.manifest_url,
            dbt = dbt().display(),
            profiles = self.diy_profiles.display(),
        );
        let started = Instant::now();
        run(
            Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false"),
            "the do-it-yourself script",
        )?;
        let seconds = started.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&work);
        Ok(seconds)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("slimci-bench-").tempdir()?;
    let project = dir.path().join("project");
    let summary = run(
        Command::new("python3")
            .arg(workspace_root().join("bench/genproject.py"))
            .args(["--models", &args.models.to_string()])
            .args(["--seed", &args.seed.to_string()])
            .arg("--out")
            .arg(&project),
        "generating the project",
    )?;
    println!("{}", summary.trim());

    let postgres = match args.warehouse {
        WarehouseKind::Postgres => {
            let postgres = Postgres::start().await?;
            postgres.create_database(PG_DATABASE)?;
            Some(postgres)
        }
        WarehouseKind::Duckdb => None,
    };
    let cluster = Cluster::start(ClusterOptions {
        project: Some(project.clone()),
        run_timeout_secs: Some(RUN_TIMEOUT.as_secs()),
        warehouse: postgres.as_ref().map(Postgres::agent_warehouse),
        repository_toml: if postgres.is_some() {
            format!(
                "[repository.warehouse]\ndatabase = \"{PG_DATABASE}\"\nschema = \"analytics\"\n"
            )
        } else {
            String::new()
        },
        ..ClusterOptions::default()
    })
    .await?;
    println!("warehouse: {}", args.warehouse.name());
    println!("deploying {} models through slimci...", args.models);
    let deploy = cluster
        .create_run(&deploy_request())
        .await
        .context("deploy")?;
    let mut cluster = cluster;
    let deploy = cluster.wait_for_run(deploy.id, RUN_TIMEOUT).await?;
    anyhow::ensure!(deploy.status == RunStatus::Success, "deploy: {deploy:?}");
    println!(
        "deploy: {:.1} s ({} nodes)",
        end_to_end_seconds(&deploy),
        deploy.nodes.as_ref().map_or(0, Vec::len)
    );
    let manifest_url = cluster.production_state().await?.manifest_url;
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir)?;
    let manifest = cluster
        .http
        .get(&manifest_url)
        .send()
        .await?
        .bytes()
        .await?;
    std::fs::write(state_dir.join("manifest.json"), &manifest)?;
    let production = cluster.production_database();

    // The engineer's checkout, warmed by one run (packages installed, parse saved).
    let hand_checkout = dir.path().join("hand");
    run(
        Command::new("git")
            .arg("clone")
            .arg("-q")
            .arg(&cluster.origin.path)
            .arg(&hand_checkout),
        "git clone",
    )?;
    let hand_profiles = dir.path().join("hand-profiles");
    let diy_profiles = dir.path().join("diy-profiles");
    let diy_database = dir.path().join("diy-pr.duckdb");
    match &postgres {
        Some(postgres) => {
            hand_profile(
                &hand_profiles,
                HandTarget::Postgres {
                    postgres,
                    schema: "pr_bench_hand",
                },
            )?;
            hand_profile(
                &diy_profiles,
                HandTarget::Postgres {
                    postgres,
                    schema: "pr_bench_diy",
                },
            )?;
        }
        None => {
            hand_profile(
                &hand_profiles,
                HandTarget::DuckDb {
                    database: dir.path().join("hand-pr.duckdb"),
                    production: &production,
                },
            )?;
            hand_profile(
                &diy_profiles,
                HandTarget::DuckDb {
                    database: diy_database.clone(),
                    production: &production,
                },
            )?;
        }
    }
    let mut bench = Bench {
        cluster,
        dir: dir.path().to_owned(),
        state_dir,
        manifest_url,
        hand_checkout,
        hand_profiles,
        diy_profiles,
        diy_database,
    };
    run(
        Command::new(dbt())
            .args(["deps", "--profiles-dir"])
            .arg(&bench.hand_profiles)
            .current_dir(&bench.hand_checkout)
            .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false"),
        "dbt deps by hand",
    )?;
    println!("warming up: one slimci run and one hand run of the change...");
    let warm = bench.commit("warm-up")?;
    let (warm_a, warm_run) = bench.slimci(&warm).await?;
    let warm_b = bench.by_hand(&warm)?;
    println!(
        "warm-up: (a) {warm_a:.2} s ({} parse), (b) {warm_b:.2} s",
        parse_mode(&warm_run)
    );
    let selected = warm_run.nodes.as_ref().map_or(0, Vec::len);
    println!("each change selects {selected} nodes (stg_0001 and its descendants, with tests)");

    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let mut breakdowns = Vec::new();
    for round in 0..args.rounds {
        let sha = bench.commit(&format!("r{}", round + 1))?;
        let mut line = format!("round {}:", round + 1);
        // Alternate which goes first, so none always runs on a machine warmed by another.
        for which in 0..3 {
            match (round + which) % 3 {
                0 => {
                    let (seconds, run) = bench.slimci(&sha).await?;
                    anyhow::ensure!(
                        run.nodes.as_ref().map_or(0, Vec::len) == selected,
                        "slimci built a different selection: {run:?}"
                    );
                    line.push_str(&format!("  (a) {seconds:.2} s"));
                    a.push(seconds);
                    breakdowns.push(breakdown(&run));
                }
                1 => {
                    let seconds = bench.by_hand(&sha)?;
                    line.push_str(&format!("  (b) {seconds:.2} s"));
                    b.push(seconds);
                }
                _ => {
                    let seconds = bench.diy(round, &sha)?;
                    line.push_str(&format!("  (c) {seconds:.2} s"));
                    c.push(seconds);
                }
            }
        }
        println!("{line}");
    }

    let (a_s, b_s, c_s) = (median(&a), median(&b), median(&c));
    println!();
    println!(
        "{:<58} {:>9}",
        format!(
            "one-line change, {} models, medians of {}",
            args.models, args.rounds
        ),
        "seconds"
    );
    println!(
        "{:<58} {a_s:>9.2}",
        "(a) slimci, request accepted to result recorded"
    );
    println!(
        "{:<58} {b_s:>9.2}",
        "(b) by hand, warm checkout (partial parse present)"
    );
    println!(
        "{:<58} {c_s:>9.2}",
        "(c) DIY script: clone, manifest, deps, build"
    );
    println!("{:<58} {:>9.2}   (target <= 1.0)", "a/b", a_s / b_s);
    println!("{:<58} {:>9.2}   (target <= 0.5)", "a/c", a_s / c_s);
    println!();
    println!("(a) phase breakdown, medians:");
    let column = |pick: &dyn Fn(&Breakdown) -> f64| {
        median(&breakdowns.iter().map(pick).collect::<Vec<f64>>())
    };
    println!(
        "  {:<34} {:>7.3} s",
        "queue wait (accepted → claimed)",
        column(&|b| b.queue)
    );
    for name in [
        "checkout",
        "state_fetch",
        "deps",
        "profile",
        "build",
        "upload",
    ] {
        let value = column(&|b: &Breakdown| {
            b.phases
                .iter()
                .find(|(phase, _)| phase == name)
                .map_or(0.0, |(_, seconds)| *seconds)
        });
        println!("  {name:<34} {value:>7.3} s");
        if name == "build" {
            println!(
                "    {:<32} {:>7.3} s",
                "dbt startup (Python, dbt import)",
                column(&|b| b.startup)
            );
            println!("    {:<32} {:>7.3} s", "parse", column(&|b| b.parse));
            println!(
                "    {:<32} {:>7.3} s",
                "execute and write artifacts",
                column(&|b| {
                    b.phases
                        .iter()
                        .find(|(phase, _)| phase == "build")
                        .map_or(f64::NAN, |(_, seconds)| *seconds)
                        - b.startup
                        - b.parse
                })
            );
        }
    }
    println!(
        "  {:<34} {:>7.3} s",
        "report (upload done → recorded)",
        column(&|b| b.report)
    );
    let modes: Vec<&str> = breakdowns.iter().map(|b| b.parse_mode.as_str()).collect();
    println!("  parse modes: {}", modes.join(", "));
    println!(
        "bench warehouse={} n_models={} a_s={a_s:.2} b_s={b_s:.2} c_s={c_s:.2} a_over_b={:.2} a_over_c={:.2}",
        args.warehouse.name(),
        args.models,
        a_s / b_s,
        a_s / c_s
    );
    // Stops the coordinator and agent before their directory goes.
    drop(bench);
    drop(dir);
    Ok(())
}
