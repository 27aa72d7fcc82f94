//! `/fleet`: the agents, what each builds, and the queue with positions.
//!
//! The coordinator has no agent registry yet: what it knows of the fleet is RabbitMQ's count
//! of consumers on the jobs queue (`Fleet`), and from the store which agent holds which running
//! attempt and which agents took runs lately. `fleet_snapshot` is the one place that gathers
//! it; when agents register (with their slots and heartbeats), it is the function to point at
//! that registry.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use slimci_proto::Topology;

use super::runs::{RunRow, run_row};
use super::{Layout, WebResult, duration, render, when};
use crate::app::AppState;
use crate::rules::RunStatus;
use crate::store::{StoreError, now_ms};

/// Agents that took a run within this long are listed even when idle.
const RECENT_MS: i64 = 24 * 3600 * 1000;
/// Queued runs listed.
const QUEUE_LISTED: u32 = 500;

/// One agent as the coordinator knows it.
pub struct AgentRow {
    pub name: String,
    /// The runs it builds now (one per busy slot).
    pub building: Vec<RunRow>,
    /// When it last started a run.
    pub last_started: String,
}

/// A queued run and its place in line.
pub struct QueuedRow {
    pub position: usize,
    pub waiting_for: String,
    pub run: RunRow,
    /// Its job is on the broker (dispatched), not held back by the scheduling rules.
    pub dispatched: bool,
}

/// What the coordinator knows of its fleet.
pub struct FleetSnapshot {
    pub jobs_queue: String,
    /// Agents consuming the jobs queue, as RabbitMQ last said; none when it was not asked lately.
    pub agents_consuming: Option<u32>,
    pub agents: Vec<AgentRow>,
    pub queue: Vec<QueuedRow>,
}

/// Gathers the fleet from `Fleet` and the store.
pub async fn fleet_snapshot(state: &AppState) -> Result<FleetSnapshot, StoreError> {
    let now = now_ms();
    let running = state
        .store
        .runs_with_status(RunStatus::Running, 10_000)
        .await?;
    let mut agents: BTreeMap<String, AgentRow> = BTreeMap::new();
    for (name, last) in state.store.recent_agents(now - RECENT_MS).await? {
        agents.insert(
            name.clone(),
            AgentRow {
                name,
                building: Vec::new(),
                last_started: when(last),
            },
        );
    }
    for run in &running {
        let name = run.agent.clone().unwrap_or_else(|| "(claiming)".to_owned());
        agents
            .entry(name.clone())
            .or_insert_with(|| AgentRow {
                name,
                building: Vec::new(),
                last_started: run.started_ms.map(when).unwrap_or_default(),
            })
            .building
            .push(run_row(run, None));
    }
    let mut agents: Vec<AgentRow> = agents.into_values().collect();
    agents.sort_by(|a, b| {
        b.building
            .len()
            .cmp(&a.building.len())
            .then(a.name.cmp(&b.name))
    });
    let queued = state
        .store
        .runs_with_status(RunStatus::Queued, QUEUE_LISTED)
        .await?;
    let queue = queued
        .iter()
        .enumerate()
        .map(|(index, run)| QueuedRow {
            position: index + 1,
            waiting_for: duration((now - run.created_ms).max(0) as f64 / 1000.0),
            dispatched: run.dispatched,
            run: run_row(run, None),
        })
        .collect();
    Ok(FleetSnapshot {
        jobs_queue: Topology::new(&state.config.amqp.prefix).jobs_queue(),
        agents_consuming: state.fleet.agents_consuming(),
        agents,
        queue,
    })
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    layout: Layout,
    fleet: FleetSnapshot,
    building: usize,
}

pub(super) async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> WebResult<Response> {
    let fleet = fleet_snapshot(&state).await?;
    let building = fleet.agents.iter().map(|agent| agent.building.len()).sum();
    Ok(render(&FleetPage {
        layout: Layout::for_request(&state, &headers, "Fleet"),
        fleet,
        building,
    }))
}
