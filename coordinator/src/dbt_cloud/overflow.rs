//! dbt Cloud as overflow capacity: the router, which decides where each routed CI run builds
//! (`rules::route`, over the fleet's free slots and dbt Cloud's load), and the loop that drives
//! the runs routed to dbt Cloud (`mirror`).
//!
//! A CI run of a repository with `[repository.dbt_cloud] routing` waits in the outbox until the
//! router decides: `fleet` hands it to the publisher, which sends its job to the agents as
//! usual; `dbt_cloud` claims it for the coordinator itself (agent `dbt-cloud`), so the
//! scheduling rules count it out and its isolation stays busy until the Cloud run ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use slimci_proto::{RepoName, RunId, RunKind};
use tokio_util::sync::CancellationToken;

use super::client::CloudStatus;
use super::mirror::Mirror;
use super::{CloudRepository, Routing};
use crate::agents::AgentState;
use crate::app::AppState;
use crate::rules::{self, Backend, CloudLoad, Route, RouteView, RunStatus};
use crate::store::Run;

/// How often waiting runs are routed and Cloud runs are looked at (each at most every
/// `run_poll_secs`).
const TICK: Duration = Duration::from_secs(1);
/// How long the router waits for dbt Cloud's load (the client's retries included) before it
/// decides without it: a slow or unreachable dbt Cloud must not hold up routing, nor the runs
/// of repositories that would build on the fleet anyway.
const LOAD_PATIENCE: Duration = Duration::from_secs(10);

/// The dbt Cloud account a repository's runs go to: repositories on one account share its run
/// slots and its queue.
type Account = (String, u64);

fn account_of(cloud: &CloudRepository) -> Account {
    (
        cloud.config.api_url.trim_end_matches('/').to_owned(),
        cloud.config.account_id,
    )
}

/// Whether `run` waits for the router before the publisher may send it to the agents: a CI run
/// of a routed repository not yet routed to the fleet.
pub fn awaits_routing(state: &AppState, run: &Run) -> bool {
    run.kind == RunKind::Ci
        && routing_of(state, &run.repository).is_some()
        && run.backend != Some(Backend::Fleet)
}

fn routing_of<'a>(
    state: &'a AppState,
    repository: &RepoName,
) -> Option<(Routing, &'a Arc<CloudRepository>)> {
    let cloud = state.dbt_cloud.repository(repository)?;
    Some((cloud.config.routing?, cloud))
}

/// Routes waiting runs, and follows each run dbt Cloud builds in a task of its own, until
/// shutdown. Runs in dbt Cloud are followed whatever the configuration says now: one routed
/// before a restart with another configuration still ends only on dbt Cloud's word.
pub async fn overflow_loop(state: Arc<AppState>, shutdown: CancellationToken) {
    let routing = async {
        if !state.dbt_cloud.routes_any() {
            return;
        }
        // When each waiting `fleet_first` run was first seen with the fleet full.
        let mut full_since: HashMap<RunId, Instant> = HashMap::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = route_waiting(&state, &mut full_since) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    };
    let following = async {
        let mut followed: HashMap<RunId, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            followed.retain(|_, task| !task.is_finished());
            match state.store.cloud_runs_in_flight().await {
                Ok(runs) => {
                    for run in runs {
                        followed.entry(run.id).or_insert_with(|| {
                            tokio::spawn(follow(state.clone(), run.id, shutdown.clone()))
                        });
                    }
                }
                Err(error) => tracing::error!(%error, "cannot read the runs in dbt Cloud"),
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(TICK) => {}
            }
        }
        for (_, task) in followed {
            let _ = task.await;
        }
    };
    tokio::join!(routing, following);
}

/// Follows one run in dbt Cloud until it ends (or shutdown), a step every tick; a slow or
/// failing dbt Cloud holds up only this run.
async fn follow(state: Arc<AppState>, id: RunId, shutdown: CancellationToken) {
    let mut mirror: Option<Mirror> = None;
    loop {
        let run = match state.store.run(id).await {
            Ok(Some(run))
                if run.status == RunStatus::Running && run.backend == Some(Backend::DbtCloud) =>
            {
                Some(run)
            }
            Ok(_) => return,
            Err(error) => {
                tracing::error!(%error, run = %id, "cannot read a run in dbt Cloud");
                None
            }
        };
        if let Some(run) = run {
            let mirror = match &mut mirror {
                Some(mirror) => Some(mirror),
                None => match Mirror::attach(&state, &run).await {
                    Ok(attached) => Some(mirror.insert(attached)),
                    Err(error) => {
                        tracing::error!(%error, run = %id, "cannot attach to a run in dbt Cloud");
                        None
                    }
                },
            };
            if let Some(mirror) = mirror {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    stepped = mirror.step(&state, &run) => if let Err(error) = stepped {
                        tracing::error!(%error, run = %id, "cannot record what dbt Cloud said of a run; trying again");
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// The fleet's slots of agents taking work, and how many are busy or promised to runs already
/// on the jobs queue.
async fn fleet_now(state: &AppState) -> (u32, u32) {
    let mut slots = 0;
    let mut taken = 0;
    for (record, agent_state) in state.agents.list(Utc::now()) {
        if matches!(agent_state, AgentState::Idle | AgentState::Busy) {
            slots += record
                .status
                .as_ref()
                .map_or(0, |status| u32::from(status.slots));
            taken += u32::from(record.busy_slots());
        }
    }
    let waiting_on_queue = state
        .store
        .active_for_rules()
        .await
        .map(|runs| {
            runs.iter()
                .filter(|run| run.status == RunStatus::Queued && run.dispatched)
                .count() as u32
        })
        .unwrap_or(0);
    (slots, taken + waiting_on_queue)
}

/// dbt Cloud's load now: the account's runs in flight (every page) and its run slots, plus the
/// runs slimci routed to the account that dbt Cloud does not list yet (not triggered, or
/// triggered a moment ago), so a burst of pushes cannot overshoot the account's limits between
/// two looks.
async fn cloud_load(
    state: &AppState,
    cloud: &CloudRepository,
    account_key: &Account,
) -> Result<CloudLoad, String> {
    let asked = async {
        let in_flight = cloud.client.in_flight().await?;
        let account = cloud.client.account().await?;
        Ok::<_, super::client::CloudError>((in_flight, account))
    };
    let (in_flight, account) = tokio::time::timeout(LOAD_PATIENCE, asked)
        .await
        .map_err(|_| {
            format!(
                "dbt Cloud did not answer within {} s",
                LOAD_PATIENCE.as_secs()
            )
        })?
        .map_err(|error| error.to_string())?;
    let not_listed = state
        .store
        .cloud_runs_in_flight()
        .await
        .map_err(|error| error.to_string())?
        .iter()
        .filter(|run| run.dbt_cloud_run_id.is_none())
        .filter(|run| {
            state
                .dbt_cloud
                .repository(&run.repository)
                .is_some_and(|other| account_of(other) == *account_key)
        })
        .count() as u32;
    let now = Utc::now();
    let queued: Vec<_> = in_flight
        .iter()
        .filter(|run| run.status() == Some(CloudStatus::Queued))
        .collect();
    let oldest_queued = queued
        .iter()
        .filter_map(|run| run.created())
        .min()
        .map(|created| (now - created).to_std().unwrap_or_default());
    Ok(CloudLoad {
        in_flight: in_flight.len() as u32 + not_listed,
        queued: queued.len() as u32,
        oldest_queued,
        run_slots: account.run_slots.map(|slots| slots as u32),
    })
}

/// Decides where each routed run the scheduling rules let go now builds. `full_since`: when
/// each waiting `fleet_first` run was first seen with the fleet full.
async fn route_waiting(state: &AppState, full_since: &mut HashMap<RunId, Instant>) {
    let chosen = crate::queue::runs_to_dispatch(state).await;
    full_since.retain(|id, _| chosen.iter().any(|run| run.id == *id));
    let mut fleet: Option<(u32, u32)> = None;
    // dbt Cloud's load, asked at most once per account per tick, then counted on.
    let mut loads: HashMap<Account, Result<CloudLoad, String>> = HashMap::new();
    for active in chosen {
        if active.kind != RunKind::Ci {
            continue;
        }
        let Some((routing, cloud)) = routing_of(state, &active.repository) else {
            continue;
        };
        let account = account_of(cloud);
        let run = match state.store.run(active.id).await {
            Ok(Some(run)) if run.backend.is_none() => run,
            Ok(_) => continue,
            Err(error) => {
                tracing::error!(%error, run = %active.id, "cannot read a run to route");
                continue;
            }
        };
        let (fleet_slots, fleet_taken) = match fleet {
            Some(fleet) => fleet,
            None => *fleet.insert(fleet_now(state).await),
        };
        // `fleet_first` waits from the moment the run could go and the fleet was full.
        let waited = if fleet_taken < fleet_slots {
            full_since.remove(&run.id);
            Duration::ZERO
        } else {
            full_since
                .entry(run.id)
                .or_insert_with(Instant::now)
                .elapsed()
        };
        let mut view = RouteView {
            routing,
            fleet_slots,
            fleet_taken,
            waited,
            fleet_wait: Duration::from_secs(cloud.config.fleet_wait_secs),
            cloud: loads.get(&account).cloned(),
            max_in_flight: cloud.config.max_in_flight,
            max_cloud_queue: Duration::from_secs(cloud.config.max_cloud_queue_secs),
        };
        let mut decision = rules::route(&view);
        if decision == Route::AskCloud {
            let load = cloud_load(state, cloud, &account).await;
            loads.insert(account.clone(), load.clone());
            view.cloud = Some(load);
            decision = rules::route(&view);
        }
        let Route::To(backend, reason) = decision else {
            continue;
        };
        let routed = match backend {
            Backend::Fleet => state.store.route_to_fleet(run.id, &reason).await,
            Backend::DbtCloud => {
                state
                    .store
                    .route_to_cloud(run.id, run.attempt, &reason)
                    .await
            }
        };
        match routed {
            Ok(true) => {
                full_since.remove(&run.id);
                tracing::info!(run = %run.id, backend = backend.as_str(), %reason, "routed");
                match backend {
                    Backend::Fleet => {
                        if let Some(fleet) = &mut fleet {
                            fleet.1 += 1;
                        }
                        state.outbox.notify_one();
                    }
                    Backend::DbtCloud => {
                        if let Some(Ok(load)) = loads.get_mut(&account) {
                            load.in_flight += 1;
                        }
                    }
                }
                let _ = state.changes.send(run.id);
            }
            Ok(false) => {}
            Err(error) => tracing::error!(%error, run = %run.id, "cannot record a run's route"),
        }
    }
}
