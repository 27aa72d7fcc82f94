//! The cluster's user API, typed: [`Cluster`] methods over slimci-client's [`Client`] (runs,
//! logs, the production state, waiting for a run to build or to end, deploying) and the run requests the
//! tests send. Raw JSON only in [`Cluster::post_run_json`], for requests that are wrong on
//! purpose.
//!
//! [`Client`]: slimci_client::Client

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use slimci_client::{PhaseView, ProductionStateView, RunRequest, RunStatus, RunView, Submitted};
use slimci_proto::{NodeResult, RunId, SandboxReport};

use crate::Cluster;
use crate::process::tail;
use crate::wait::wait_for;

/// The repository every test cluster serves.
pub const REPOSITORY: &str = "shop";

/// A CI run of PR `pr` at `sha`.
pub fn ci_request(pr: u64, sha: &str) -> RunRequest {
    RunRequest {
        repository: REPOSITORY.to_owned(),
        pr: Some(pr),
        sha: Some(sha.to_owned()),
        ..RunRequest::default()
    }
}

/// A deploy of the production branch's head.
pub fn deploy_request() -> RunRequest {
    RunRequest {
        repository: REPOSITORY.to_owned(),
        kind: Some("deploy".to_owned()),
        ..RunRequest::default()
    }
}

/// The phases of a run's full view; panics, printing the run, on a short view.
pub fn phases_of(run: &RunView) -> &[PhaseView] {
    run.phases
        .as_deref()
        .unwrap_or_else(|| panic!("no phases in {run:?}"))
}

/// The nodes of a run's full view; panics, printing the run, on a short view.
pub fn nodes_of(run: &RunView) -> &[NodeResult] {
    run.nodes
        .as_deref()
        .unwrap_or_else(|| panic!("no nodes in {run:?}"))
}

/// The protections a run's build had (the agent's report); panics, printing the run, before
/// the build started.
pub fn sandbox_of(run: &RunView) -> &SandboxReport {
    run.sandbox
        .as_ref()
        .unwrap_or_else(|| panic!("no sandbox in {run:?}"))
}

impl Cluster {
    /// `POST /api/v1/runs`: the run, and whether this request created it (201) or found the
    /// same commit already queued or building (200). A refusal is an error.
    pub async fn post_run(&self, request: &RunRequest) -> anyhow::Result<Submitted> {
        self.client
            .create_run(request)
            .await
            .with_context(|| format!("POST run {request:?}"))
    }

    /// `POST /api/v1/runs`, which must create a new run (201); returns it.
    pub async fn create_run(&self, request: &RunRequest) -> anyhow::Result<RunView> {
        let submitted = self.post_run(request).await?;
        anyhow::ensure!(
            submitted.created,
            "{request:?} found an existing run instead of creating one (HTTP 200): {:?}",
            submitted.run
        );
        Ok(submitted.run)
    }

    /// `POST /api/v1/runs` with any JSON body, answered with its status and JSON. Only for
    /// tests that send malformed or unknown fields on purpose; everything else uses
    /// [`Cluster::post_run`].
    pub async fn post_run_json(&self, body: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}/api/v1/runs", self.url))
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// `GET /api/v1/runs/{id}`: the full view.
    pub async fn run(&self, id: RunId) -> anyhow::Result<RunView> {
        self.client
            .run(id)
            .await
            .with_context(|| format!("GET run {id}"))
    }

    /// `GET /api/v1/runs`: the newest 1000 runs, short views.
    pub async fn runs(&self) -> anyhow::Result<Vec<RunView>> {
        self.runs_where(None, 1000).await
    }

    /// `GET /api/v1/runs?status=...&limit=...`: the newest `limit` runs in `status` (any, for
    /// `None`), short views.
    pub async fn runs_where(
        &self,
        status: Option<RunStatus>,
        limit: u32,
    ) -> anyhow::Result<Vec<RunView>> {
        self.client
            .runs(None, status.map(RunStatus::as_str), limit)
            .await
            .context("GET runs")
    }

    /// `GET /api/v1/runs/{id}/logs`: the stored log, every attempt.
    pub async fn log(&self, id: RunId) -> anyhow::Result<String> {
        self.client
            .logs(id)
            .await
            .with_context(|| format!("GET the log of run {id}"))
    }

    /// `GET /api/v1/repositories/shop/production-state`.
    pub async fn production_state(&self) -> anyhow::Result<ProductionStateView> {
        self.client
            .production_state(REPOSITORY)
            .await
            .context("GET the production state")
    }

    /// Waits until the run is terminal and returns it.
    pub async fn wait_for_run(&mut self, id: RunId, timeout: Duration) -> anyhow::Result<RunView> {
        let result = wait_for(&format!("run {id} to end"), timeout, || async {
            let run = self.run(id).await?;
            Ok(run.status.is_terminal().then_some(run))
        })
        .await;
        if result.is_err() {
            self.assert_all_alive();
            eprintln!("coordinator log:\n{}", tail(&self.coordinator.log));
            for agent in &self.agents {
                eprintln!("{} log:\n{}", agent.name, tail(&agent.log));
            }
        }
        result
    }

    /// Waits until the run is building (running, its `build` phase started) and returns it.
    pub async fn wait_building(&self, id: RunId, timeout: Duration) -> anyhow::Result<RunView> {
        wait_for("the run to be building", timeout, || async {
            let run = self.run(id).await?;
            let building = run.status == RunStatus::Running
                && run
                    .phases
                    .as_ref()
                    .is_some_and(|phases| phases.iter().any(|phase| phase.phase == "build"));
            Ok(building.then_some(run))
        })
        .await
    }

    /// Waits until the run is terminal; fails, with the run and its log, unless it succeeded.
    pub async fn wait_for_success(
        &mut self,
        id: RunId,
        timeout: Duration,
    ) -> anyhow::Result<RunView> {
        let run = self.wait_for_run(id, timeout).await?;
        if run.status != RunStatus::Success {
            let log = self.log(id).await.unwrap_or_default();
            anyhow::bail!("run ended {}: {run:?}\n{log}", run.status);
        }
        Ok(run)
    }

    /// Deploys main and waits for it to succeed; returns the run.
    pub async fn deploy(&mut self) -> anyhow::Result<RunView> {
        let run = match self.create_run(&deploy_request()).await {
            Ok(run) => run,
            Err(error) => anyhow::bail!(
                "deploy request: {error:#}\ncoordinator log:\n{}",
                tail(&self.coordinator.log)
            ),
        };
        let run = self.wait_for_run(run.id, Duration::from_secs(180)).await?;
        anyhow::ensure!(
            run.status == RunStatus::Success,
            "deploy ended {}: {:?}",
            run.status,
            run.message
        );
        Ok(run)
    }
}
