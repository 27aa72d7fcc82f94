//! `/fleet`: the agents, what each builds, and the queue with positions.
//!
//! The agents are the registry's (`crate::agents`, the same as `GET /api/v1/agents`): each as
//! its last heartbeat said (version, slots, busy slots, draining) and where it stands by
//! `agent_state`. A running run whose agent the registry does not know (the coordinator
//! restarted and that agent has not sent a heartbeat since) is still listed under its agent's
//! name. `fleet_snapshot` is the one place that gathers what the page shows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::Utc;
use slimci_proto::{RunId, Topology};

use super::runs::{RunRow, run_row};
use super::{Layout, WebResult, duration, render, when};
use crate::agents::FleetTotals;
use crate::app::AppState;
use crate::rules::RunStatus;
use crate::store::{DBT_CLOUD_AGENT, Run, StoreError, now_ms};

/// Queued runs listed.
const QUEUE_LISTED: u32 = 500;
/// Running runs read to say what each agent builds.
const RUNNING_READ: u32 = 10_000;

/// One agent as the coordinator knows it.
pub struct AgentRow {
    pub name: String,
    /// `idle`, `busy`, `draining`, `offline`, `unknown` for an agent known only by a run it
    /// holds, or `dbt_cloud` for the runs dbt Cloud builds.
    pub state: &'static str,
    pub version: Option<String>,
    /// Its slots, as its heartbeat said; none for an agent that has not said.
    pub slots: Option<u16>,
    pub busy_slots: u16,
    /// The runs it builds now (one per busy slot).
    pub building: Vec<RunRow>,
    /// When it was last heard from, and how long ago.
    pub last_heartbeat: Option<(String, String)>,
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
    /// Agents by state, and slots over the agents not offline.
    pub totals: FleetTotals,
    pub queue: Vec<QueuedRow>,
}

impl FleetSnapshot {
    /// Busy slots over slots, as a whole percentage.
    pub fn saturation_percent(&self) -> u32 {
        (self.totals.saturation() * 100.0).round() as u32
    }

    /// Runs being built, over every agent.
    pub fn building(&self) -> usize {
        self.agents.iter().map(|agent| agent.building.len()).sum()
    }
}

/// Gathers the fleet from the agents registry, `Fleet` and the store.
pub async fn fleet_snapshot(state: &AppState) -> Result<FleetSnapshot, StoreError> {
    let now = now_ms();
    let at = Utc::now();
    let running = state
        .store
        .runs_with_status(RunStatus::Running, RUNNING_READ)
        .await?;
    let mut running_by_id: HashMap<RunId, &Run> = running.iter().map(|run| (run.id, run)).collect();
    let mut agents: BTreeMap<String, AgentRow> = BTreeMap::new();
    for (record, agent_state) in state.agents.list(at) {
        let mut building = Vec::new();
        for id in &record.current_runs {
            match running_by_id.remove(id) {
                Some(run) => building.push(run_row(run, None)),
                // Claimed a moment ago, or ended a moment ago: read it on its own.
                None => {
                    if let Some(run) = state.store.run(*id).await? {
                        building.push(run_row(&run, None));
                    }
                }
            }
        }
        let silent_s = (at - record.last_heartbeat).num_milliseconds().max(0) as f64 / 1000.0;
        agents.insert(
            record.name.to_string(),
            AgentRow {
                name: record.name.to_string(),
                state: agent_state.as_str(),
                version: record.status.as_ref().map(|status| status.version.clone()),
                slots: record.status.as_ref().map(|status| status.slots),
                busy_slots: record.busy_slots(),
                building,
                last_heartbeat: Some((
                    when(record.last_heartbeat.timestamp_millis()),
                    duration(silent_s),
                )),
            },
        );
    }
    // Running runs of agents the registry does not know (yet), and those dbt Cloud builds (the
    // coordinator holds them as agent `dbt-cloud`).
    for run in running_by_id.into_values() {
        let name = run.agent.clone().unwrap_or_else(|| "(claiming)".to_owned());
        let in_cloud = name == DBT_CLOUD_AGENT;
        let row = agents.entry(name.clone()).or_insert_with(|| AgentRow {
            name,
            state: if in_cloud { "dbt_cloud" } else { "unknown" },
            version: None,
            slots: None,
            busy_slots: 0,
            building: Vec::new(),
            last_heartbeat: None,
        });
        row.building.push(run_row(run, None));
        if matches!(row.state, "unknown" | "dbt_cloud") {
            row.busy_slots += 1;
        }
    }
    let mut agents: Vec<AgentRow> = agents.into_values().collect();
    // Busy agents first, offline ones last.
    let rank = |state: &str| match state {
        "busy" => 0,
        "draining" => 1,
        "idle" => 2,
        "dbt_cloud" => 3,
        "unknown" => 3,
        _ => 4,
    };
    agents.sort_by(|a, b| rank(a.state).cmp(&rank(b.state)).then(a.name.cmp(&b.name)));
    for agent in &mut agents {
        agent.building.sort_by(|a, b| a.id.cmp(&b.id));
    }
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
        totals: state.agents.totals(at),
        queue,
    })
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    layout: Layout,
    fleet: FleetSnapshot,
}

pub(super) async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> WebResult<Response> {
    let fleet = fleet_snapshot(&state).await?;
    Ok(render(&FleetPage {
        layout: Layout::for_request(&state, &headers, "Fleet"),
        fleet,
    }))
}
