//! The agent's caches, through the real agent, dbt and DuckDB: a PR build starts from the parse
//! production's deploy made for CI builds (dbt's own partial parsing, with a profile that is the
//! same for every PR), packages are restored by their files' hash instead of `dbt deps`, what
//! each run used is recorded with the run, and no PR can change another PR's build through
//! them: PR builds read the caches, only deploys write them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use slimci_client::RunView;
use slimci_proto::{CacheReport, RunId};
use slimci_tests::{
    Cluster, ClusterOptions, ci_request, dump_database, edits, nodes_of, phases_of, sandbox_of,
};

const RUN_TIMEOUT: Duration = Duration::from_secs(240);

fn built_models(run: &RunView) -> BTreeSet<String> {
    nodes_of(run)
        .iter()
        .filter(|node| node.resource_type == "model")
        .map(|node| node.unique_id.clone())
        .collect()
}

/// The caches a run reports using.
fn caches(run: &RunView) -> &CacheReport {
    run.caches
        .as_ref()
        .unwrap_or_else(|| panic!("no caches in {run:?}"))
}

async fn ci(cluster: &mut Cluster, pr: u64, sha: &str) -> RunView {
    let run = cluster.create_run(&ci_request(pr, sha)).await.unwrap();
    cluster.wait_for_success(run.id, RUN_TIMEOUT).await.unwrap()
}

/// Commits a local package (`shop_utils`, with a macro `twice`) and a model that uses it and
/// reads stg_orders, so a change to stg_orders rebuilds it.
fn add_package(cluster: &Cluster) {
    let origin = &cluster.origin;
    std::fs::create_dir_all(origin.path.join("vendor/shop_utils/macros")).unwrap();
    for (file, content) in [
        (
            "vendor/shop_utils/dbt_project.yml",
            "name: shop_utils\nversion: '1.0.0'\nconfig-version: 2\n",
        ),
        (
            "vendor/shop_utils/macros/twice.sql",
            "{% macro twice(x) %}({{ x }}) * 2{% endmacro %}\n",
        ),
        (
            "models/marts/uses_package.sql",
            "select {{ shop_utils.twice(2) }} as four, count(*) as orders from {{ ref('stg_orders') }}\n",
        ),
        ("packages.yml", "packages:\n  - local: vendor/shop_utils\n"),
    ] {
        origin.commit_file_on_main(file, content).unwrap();
    }
}

/// The parse a deploy published for CI builds: (artifact name, sha256).
fn published_parse(deploy: &RunView) -> (String, String) {
    let artifacts = deploy
        .artifacts
        .as_ref()
        .unwrap_or_else(|| panic!("no artifacts in {deploy:?}"));
    let parses: Vec<_> = artifacts
        .iter()
        .filter(|artifact| artifact.name.starts_with("ci-parse-"))
        .collect();
    assert_eq!(parses.len(), 1, "{artifacts:?}");
    (parses[0].name.clone(), parses[0].sha256.clone())
}

/// Every file of the agent's parse and deps caches (locks aside), with its sha256.
fn cache_files(cluster: &Cluster) -> BTreeMap<String, String> {
    fn walk(directory: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(listing) = std::fs::read_dir(directory) else {
            return;
        };
        for entry in listing.filter_map(Result::ok) {
            let path = entry.path();
            let file_type = entry.file_type().unwrap();
            if file_type.is_dir() {
                walk(&path, root, out);
            } else if file_type.is_file() && !path.to_string_lossy().ends_with(".lock") {
                let digest = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
                let name = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(name, digest);
            }
        }
    }
    let root = cluster.agent_work_dir(0).join("cache");
    let mut files = BTreeMap::new();
    for kind in ["parse", "deps"] {
        walk(&root.join(kind), &root, &mut files);
    }
    files
}

/// The deploys that wrote the agent's parse and deps entries (their `origin.json`).
fn cache_origins(cluster: &Cluster) -> BTreeSet<RunId> {
    let root = cluster.agent_work_dir(0).join("cache");
    let mut origins = BTreeSet::new();
    for kind in ["parse", "deps"] {
        for entry in std::fs::read_dir(root.join(kind))
            .unwrap()
            .filter_map(Result::ok)
        {
            let origin = entry.path().join("origin.json");
            if entry.path().is_dir() {
                let origin: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&origin).unwrap()).unwrap();
                origins.insert(serde_json::from_value(origin["deploy_run_id"].clone()).unwrap());
            }
        }
    }
    origins
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pr_starts_from_the_parse_and_packages_of_production() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    add_package(&cluster);

    let deploy = cluster.deploy().await.unwrap();
    assert_eq!(
        caches(&deploy).deps.as_deref(),
        Some("installed"),
        "{deploy:?}"
    );
    assert_eq!(caches(&deploy).parse.as_deref(), Some("full"), "{deploy:?}");
    // After building, the deploy parsed production's code for CI builds and published it.
    let seed_phase = phases_of(&deploy)
        .iter()
        .find(|phase| phase.phase == "seed_parse")
        .unwrap_or_else(|| panic!("no seed_parse phase in {deploy:?}"));
    assert_eq!(seed_phase.ok, Some(true), "{deploy:?}");
    let (artifact, _) = published_parse(&deploy);
    let log = cluster.log(deploy.id).await.unwrap();
    assert!(
        log.contains(&format!(
            "published production's parse for CI builds as {artifact}"
        )),
        "{log}"
    );

    let first_sha = cluster
        .origin
        .pull_request(1, &[edits::ADD_COLUMN])
        .unwrap();
    let first = ci(&mut cluster, 1, &first_sha).await;
    let used = caches(&first);
    assert_eq!(used.deps.as_deref(), Some("hit"), "{first:?}");
    assert_eq!(used.state.as_deref(), Some("downloaded"), "{first:?}");
    // The first PR already starts from production's parse: dbt reparses only its change.
    assert_eq!(used.parse.as_deref(), Some("partial"), "{first:?}");
    assert_eq!(used.parse_from, Some(deploy.id), "{first:?}");
    let log = cluster.log(first.id).await.unwrap();
    assert!(
        log.contains(&format!(
            "starting from the parse deploy {} saved",
            deploy.id
        )),
        "{log}"
    );
    assert!(log.contains("packages restored from the cache"), "{log}");

    // Another PR, another database and another commit: the same parse, the same packages.
    let second_sha = cluster
        .origin
        .pull_request(2, &[edits::ADD_COLUMN, edits::RESPACE])
        .unwrap();
    let second = ci(&mut cluster, 2, &second_sha).await;
    let used = caches(&second);
    assert_eq!(used.parse.as_deref(), Some("partial"), "{second:?}");
    assert_eq!(used.parse_from, Some(deploy.id), "{second:?}");
    assert!(used.parse_reason.is_none(), "{second:?}");
    assert_eq!(used.deps.as_deref(), Some("hit"), "{second:?}");
    assert_eq!(used.state.as_deref(), Some("hit"), "{second:?}");
    assert_eq!(used.git.as_deref(), Some("fetched"), "{second:?}");
    // The build ran on the slot's pre-started dbt, confined to the build's own rules.
    assert!(sandbox_of(&second).prestarted, "{second:?}");
    assert_eq!(sandbox_of(&second).landlock, "full", "{second:?}");
    // The reused parse changes nothing about what is built.
    assert_eq!(built_models(&second), built_models(&first));
    assert_eq!(built_models(&second).len(), 7, "{second:?}");
    // Each PR wrote its own database, under its own directory.
    assert!(cluster.pr_database(1).is_file());
    assert!(cluster.pr_database(2).is_file());

    // A commit that changes the parse inputs (here dbt_project.yml) has no production parse:
    // a saved parse is never used for other inputs.
    let project = std::fs::read_to_string(cluster.origin.path.join("dbt_project.yml")).unwrap();
    let first_line = project.lines().next().unwrap();
    let third_sha = cluster
        .origin
        .pull_request(
            3,
            &[
                edits::ADD_COLUMN,
                (
                    "dbt_project.yml",
                    first_line,
                    &format!("{first_line}\n# a comment"),
                ),
            ],
        )
        .unwrap();
    let third = ci(&mut cluster, 3, &third_sha).await;
    assert_eq!(caches(&third).parse.as_deref(), Some("full"), "{third:?}");
    assert_eq!(caches(&third).parse_from, None, "{third:?}");
    let log = cluster.log(third.id).await.unwrap();
    assert!(
        log.contains(&format!(
            "deploy {} published no parse for this build's parse inputs",
            deploy.id
        )),
        "{log}"
    );

    // Only the deploy wrote the caches, whatever the PRs did.
    assert_eq!(cache_origins(&cluster), BTreeSet::from([deploy.id]));

    // `slimci show` says what the run used.
    let output = cluster.run_cli(&["show", &second.id.to_string()]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "caches: git fetched, state hit, deps hit, partial parse from deploy {}",
            deploy.id
        )),
        "{stdout}"
    );
}

/// PR A's Python model, run inside A's dbt: it rewrites A's own saved parse so that
/// fct_orders (a file A does not change) selects no rows, rewrites the package macro every
/// build calls, and tries to write the agent's cache files (`targets`) directly. It returns
/// what happened to each.
fn hostile_model(targets: &[String]) -> String {
    let targets = targets
        .iter()
        .map(|path| format!("    {path:?},\n"))
        .collect::<String>();
    format!(
        r#"import os

# dbt refuses Jinja in a Python model's file, so the braces are put together at run time.
OPEN, CLOSE = "{{" + "{{", "}}" + "}}"
POISON = "select * from " + OPEN + " ref('stg_orders') " + CLOSE + " where 1 = 0"
MACRO = "{{" + "% macro twice(x) %" + "}}0{{" + "% endmacro %" + "}}\n"
CACHE_FILES = [
{targets}]


def model(dbt, session):
    dbt.config(materialized="table")
    from dbt.parser.manifest import extended_mashumaro_encoder, extended_mashumuro_decoder

    outcomes = []
    parse = os.path.join(os.environ["DBT_TARGET_PATH"], "partial_parse.msgpack")
    with open(parse, "rb") as file:
        saved = extended_mashumuro_decoder(file.read())
    saved["nodes"]["model.shop.fct_orders"]["raw_code"] = POISON
    with open(parse, "wb") as file:
        file.write(extended_mashumaro_encoder(saved))
    outcomes.append(("own parse", "rewritten"))
    for root, _, files in os.walk("dbt_packages", followlinks=True):
        for name in files:
            if name.endswith(".sql"):
                with open(os.path.join(root, name), "w") as file:
                    file.write(MACRO)
                outcomes.append(("own packages", "rewritten"))
    for path in CACHE_FILES:
        try:
            with open(path, "r+b") as file:
                file.write(b"poisoned")
            outcomes.append((path, "written"))
        except OSError as error:
            outcomes.append((path, type(error).__name__))
    values = ", ".join("('%s', '%s')" % pair for pair in outcomes)
    return session.sql("select * from (values %s) as t(what, outcome)" % values)
"#
    )
}

/// The rows of `table` in PR `pr`'s database (production attached, as its builds see it).
fn pr_rows(cluster: &Cluster, pr: u64, table: &str) -> serde_json::Value {
    let database = dump_database(
        &cluster.pr_database(pr),
        Some(&cluster.production_database()),
    )
    .unwrap();
    database[table]["rows"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pr_cannot_change_another_prs_build_through_the_agents_caches() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    add_package(&cluster);
    let deploy = cluster.deploy().await.unwrap();
    let (artifact, published_sha256) = published_parse(&deploy);
    let production = dump_database(&cluster.production_database(), None).unwrap();
    let production_orders = production["main.fct_orders"]["rows"].clone();
    assert!(
        !production_orders.as_array().unwrap().is_empty(),
        "{production}"
    );
    let cache_before = cache_files(&cluster);
    assert!(
        cache_before.keys().any(|name| name.starts_with("parse/"))
            && cache_before.keys().any(|name| name.starts_with("deps/")),
        "{cache_before:?}"
    );
    let cache_root = cluster.agent_work_dir(0).join("cache");
    let targets: Vec<String> = cache_before
        .keys()
        .map(|name| cache_root.join(name).display().to_string())
        .collect();

    // PR A attacks from inside its own build.
    let hostile = hostile_model(&targets);
    let a_sha = cluster
        .origin
        .pull_request(1, &[("models/marts/hostile.py", "", &hostile)])
        .unwrap();
    let a = ci(&mut cluster, 1, &a_sha).await;
    let outcomes = pr_rows(&cluster, 1, "main.hostile");
    let outcomes: Vec<String> = serde_json::from_value(outcomes).unwrap();
    // The attack ran: A rewrote what its own build could write...
    assert!(
        outcomes
            .iter()
            .any(|row| row.contains("own parse") && row.contains("rewritten")),
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|row| row.contains("own packages") && row.contains("rewritten")),
        "{outcomes:?}"
    );
    // ...and could write none of the agent's cache files.
    let denied = outcomes
        .iter()
        .filter(|row| row.contains(cache_root.to_str().unwrap()))
        .collect::<Vec<_>>();
    assert_eq!(denied.len(), targets.len(), "{outcomes:?}");
    assert!(
        denied.iter().all(|row| !row.contains("'written'")),
        "{outcomes:?}"
    );

    // PR B, next on the same agent, changes stg_orders: fct_orders and uses_package (files B
    // does not change) are rebuilt from production's parse and packages, not A's.
    let b_sha = cluster
        .origin
        .pull_request(2, &[edits::ADD_COLUMN])
        .unwrap();
    let b = ci(&mut cluster, 2, &b_sha).await;
    let models = built_models(&b);
    assert!(models.contains("model.shop.fct_orders"), "{b:?}");
    assert!(models.contains("model.shop.uses_package"), "{b:?}");
    assert_eq!(pr_rows(&cluster, 2, "main.fct_orders"), production_orders);
    let uses_package: Vec<String> =
        serde_json::from_value(pr_rows(&cluster, 2, "main.uses_package")).unwrap();
    assert!(uses_package[0].starts_with("(4, "), "{uses_package:?}");
    // The parse B used is the one the deploy published, byte for byte; no PR wrote a cache.
    assert_eq!(caches(&b).parse.as_deref(), Some("partial"), "{b:?}");
    assert_eq!(caches(&b).parse_from, Some(deploy.id), "{b:?}");
    assert_eq!(cache_files(&cluster), cache_before);
    let key = artifact
        .trim_start_matches("ci-parse-")
        .trim_end_matches(".msgpack");
    assert_eq!(
        cache_before[&format!("parse/{key}/partial_parse.msgpack")],
        published_sha256
    );
    assert_eq!(cache_origins(&cluster), BTreeSet::from([deploy.id]));
    assert_ne!(a.id, b.id);

    // A cache file damaged on disk is caught before dbt sees it and fetched again.
    let local = cache_root.join(format!("parse/{key}/partial_parse.msgpack"));
    let mut bytes = std::fs::read(&local).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&local, &bytes).unwrap();
    let c_sha = cluster
        .origin
        .pull_request(3, &[edits::ADD_COLUMN, edits::RESPACE])
        .unwrap();
    let c = ci(&mut cluster, 3, &c_sha).await;
    let log = cluster.log(c.id).await.unwrap();
    assert!(
        log.contains(&format!(
            "the saved parse of deploy {} is damaged",
            deploy.id
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "downloaded production's parse from deploy {}",
            deploy.id
        )),
        "{log}"
    );
    assert_eq!(caches(&c).parse.as_deref(), Some("partial"), "{c:?}");
    assert_eq!(cache_files(&cluster), cache_before);

    // A parse dbt cannot read (here the published one, garbled at its source) costs a full
    // parse, with dbt's reason, and nothing else: the build passes, the agent goes on.
    let stored = cluster
        .dir
        .path()
        .join("coordinator/artifacts")
        .join(deploy.id.to_string())
        .join(&artifact);
    std::fs::write(&stored, b"not a parse at all").unwrap();
    std::fs::write(&local, b"damaged too").unwrap();
    let d_sha = cluster
        .origin
        .pull_request(4, &[edits::ADD_COLUMN])
        .unwrap();
    let d = ci(&mut cluster, 4, &d_sha).await;
    assert_eq!(caches(&d).parse.as_deref(), Some("full"), "{d:?}");
    assert_eq!(
        caches(&d).parse_reason.as_deref(),
        Some("the saved parse could not be read"),
        "{d:?}"
    );
    let log = cluster.log(d.id).await.unwrap();
    assert!(
        log.contains("dbt parsed the whole project: the saved parse could not be read"),
        "{log}"
    );
    assert_eq!(pr_rows(&cluster, 4, "main.fct_orders"), production_orders);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_its_caches_within_their_size_limit() {
    // A limit far below one parse file: after each run, everything not in use is evicted.
    let mut cluster = Cluster::start(ClusterOptions {
        warehouse_extra: "[cache]\nmax_bytes = 1024\n".to_owned(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.deploy().await.unwrap();
    let sha = cluster
        .origin
        .pull_request(1, &[edits::ADD_COLUMN])
        .unwrap();
    let run = ci(&mut cluster, 1, &sha).await;
    // The deploy's parse for CI builds was evicted after the deploy: fetched again from it.
    assert_eq!(caches(&run).parse.as_deref(), Some("partial"), "{run:?}");
    let log = cluster.log(run.id).await.unwrap();
    assert!(log.contains("downloaded production's parse"), "{log}");
    let cache = cluster.agent_work_dir(0).join("cache");
    slimci_tests::wait_for(
        "the agent to evict its caches",
        Duration::from_secs(30),
        || async {
            let size = slimci_tests::disk_usage(&cache);
            Ok((size <= 1024).then_some(()))
        },
    )
    .await
    .unwrap();
    // Evicted entries are fetched again and the build still succeeds.
    let sha = cluster
        .origin
        .pull_request(2, &[edits::ADD_COLUMN])
        .unwrap();
    let run = ci(&mut cluster, 2, &sha).await;
    let used = caches(&run);
    assert_eq!(used.state.as_deref(), Some("downloaded"), "{run:?}");
    assert_eq!(used.git.as_deref(), Some("fetched"), "{run:?}");
    assert_eq!(used.parse.as_deref(), Some("partial"), "{run:?}");
}
