//! The cluster every measurement starts (the harness's, with the stub dbt on
//! `tests/fixtures/stub`) and what they do with it: set the stub's behaviour per commit, deploy,
//! read a run's phases, and the record file the stub writes its start and end to.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use slimci_client::RunView;
use slimci_proto::Attempt;
use slimci_tests::measure::ms_of;
use slimci_tests::{Cluster, ClusterOptions, binary, wait_for, workspace_root};

/// A record file for the stub dbt (`record` in its JSON), removed at the end.
pub struct Record(pub PathBuf);

impl Record {
    pub fn new() -> Record {
        Record(slimci_tests::record_file())
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A cluster whose builds use the stub dbt on `tests/fixtures/stub`, its agents connected.
pub async fn stub_cluster(
    agents: usize,
    slots: u16,
    repository_toml: &str,
    coordinator_toml: &str,
) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start(ClusterOptions {
        agents,
        slots,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        repository_toml: repository_toml.to_owned(),
        coordinator_toml: coordinator_toml.to_owned(),
        ..Default::default()
    })
    .await?;
    for agent in &cluster.agents {
        wait_for(
            &format!("{} to consume jobs", agent.name),
            Duration::from_secs(30),
            || async {
                Ok(std::fs::read_to_string(&agent.log)
                    .unwrap_or_default()
                    .contains("waiting for jobs")
                    .then_some(()))
            },
        )
        .await?;
    }
    Ok(cluster)
}

/// Commits the stub's behaviour on main; returns the commit.
pub fn set_stub(cluster: &Cluster, stub: &Value) -> anyhow::Result<String> {
    cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub.to_string())
}

/// A new commit for PR `pr` (a commit on main with this stub behaviour, `refs/pull/<pr>/head`
/// pointed at it).
pub fn pr_commit(cluster: &Cluster, pr: u64, stub: &Value) -> anyhow::Result<String> {
    let sha = set_stub(cluster, stub)?;
    cluster.origin.point_pull_request(pr, &sha)?;
    Ok(sha)
}

/// Deploys main with an instant stub build, for the production state CI runs need.
pub async fn deploy(cluster: &mut Cluster, record: Option<&Record>) -> anyhow::Result<()> {
    let mut stub = json!({ "duration_ms": 0, "nodes": 3, "log_lines": 5 });
    if let Some(record) = record {
        stub["record"] = json!(record.0);
    }
    set_stub(cluster, &stub)?;
    cluster.deploy().await.context("the deploy")?;
    Ok(())
}

/// The started and finished ms of a phase of attempt 1.
pub fn phase(run: &RunView, name: &str) -> (Option<i64>, Option<i64>) {
    run.phases
        .iter()
        .flatten()
        .find(|phase| phase.phase == name && phase.attempt == Attempt(1))
        .map_or((None, None), |phase| {
            (
                ms_of(&phase.started_at),
                phase.finished_at.as_deref().and_then(ms_of),
            )
        })
}

/// The tail of every process's log, when a wait failed.
pub fn print_logs(cluster: &Cluster) {
    eprintln!(
        "coordinator log:\n{}",
        slimci_tests::tail(&cluster.coordinator.log)
    );
    for agent in &cluster.agents {
        eprintln!("{} log:\n{}", agent.name, slimci_tests::tail(&agent.log));
    }
}
