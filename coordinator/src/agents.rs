//! The fleet as the coordinator knows it from the agents themselves: every agent that sent a
//! heartbeat (busy agents every third of a lease, idle ones every `REGISTER_EVERY` to say they
//! are there) or claimed a run. `Agents` is plain data behind a lock, read by the API
//! (`GET /api/v1/agents`), the metrics and the web pages; `agent_state` is the one rule that
//! says whether an agent is idle, busy, draining or offline.
//!
//! It lives in memory: after a restart the coordinator knows its fleet again within one
//! heartbeat interval.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use slimci_proto::{AgentName, AgentStatus, Lease, RunId};

/// An agent not heard from for this long is offline. Agents send a heartbeat at least every
/// 10 s (`slimci_agent::lease::REGISTER_EVERY`), so this is three missed ones.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(30);
/// An offline agent is forgotten after this long (a VM that was replaced).
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Where an agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Heard from lately, building nothing.
    Idle,
    /// Building at least one run.
    Busy,
    /// Shutting down: finishing what it holds, taking nothing new.
    Draining,
    /// Not heard from for `OFFLINE_AFTER`.
    Offline,
}

impl AgentState {
    pub const ALL: [AgentState; 4] = [
        AgentState::Idle,
        AgentState::Busy,
        AgentState::Draining,
        AgentState::Offline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Idle => "idle",
            AgentState::Busy => "busy",
            AgentState::Draining => "draining",
            AgentState::Offline => "offline",
        }
    }
}

/// One agent as last heard from.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    pub name: AgentName,
    /// What its last heartbeat said of itself; `None` for an agent known only by its claims
    /// (one older than the fleet view).
    pub status: Option<AgentStatus>,
    /// The runs it holds: its last heartbeat's leases, plus claims granted since, less runs
    /// that ended since.
    pub current_runs: Vec<RunId>,
    pub last_heartbeat: DateTime<Utc>,
}

impl AgentRecord {
    /// Slots building now, as far as the coordinator knows.
    pub fn busy_slots(&self) -> u16 {
        let held = u16::try_from(self.current_runs.len()).unwrap_or(u16::MAX);
        self.status
            .as_ref()
            .map_or(held, |status| status.busy.max(held))
    }
}

/// Where an agent last heard from at `last_heartbeat` stands at `now`.
pub fn agent_state(record: &AgentRecord, now: DateTime<Utc>) -> AgentState {
    let silent = (now - record.last_heartbeat).to_std().unwrap_or_default();
    if silent >= OFFLINE_AFTER {
        AgentState::Offline
    } else if record.status.as_ref().is_some_and(|status| status.draining) {
        AgentState::Draining
    } else if record.busy_slots() > 0 {
        AgentState::Busy
    } else {
        AgentState::Idle
    }
}

/// The fleet's totals, as the metrics and the fleet page show them. Offline agents count for
/// nothing but their own number.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetTotals {
    pub by_state: BTreeMap<AgentState, u32>,
    pub slots: u32,
    pub busy_slots: u32,
}

impl FleetTotals {
    /// Busy slots over slots; 0 for a fleet with none.
    pub fn saturation(&self) -> f64 {
        if self.slots == 0 {
            0.0
        } else {
            f64::from(self.busy_slots) / f64::from(self.slots)
        }
    }
}

/// Every agent the coordinator heard from, by name.
#[derive(Default)]
pub struct Agents {
    agents: Mutex<BTreeMap<AgentName, AgentRecord>>,
}

impl Agents {
    /// A heartbeat: the agent is alive, holds `leases`, and says `status` of itself. Returns
    /// the agents forgotten now (silent for `FORGET_AFTER`), whose metrics series can go.
    #[must_use = "the forgotten agents' metrics series are to be dropped"]
    pub fn heartbeat(
        &self,
        agent: &AgentName,
        leases: &[Lease],
        status: Option<&AgentStatus>,
        now: DateTime<Utc>,
    ) -> Vec<AgentName> {
        let mut agents = self.agents.lock().expect("agents lock");
        let record = agents.entry(agent.clone()).or_insert_with(|| {
            tracing::info!(%agent, "agent registered");
            AgentRecord {
                name: agent.clone(),
                status: None,
                current_runs: Vec::new(),
                last_heartbeat: now,
            }
        });
        record.last_heartbeat = now;
        if let Some(status) = status {
            record.status = Some(status.clone());
        }
        record.current_runs = leases.iter().map(|lease| lease.run_id).collect();
        let mut forgotten = Vec::new();
        agents.retain(|name, record| {
            let keep = (now - record.last_heartbeat)
                .to_std()
                .is_ok_and(|silent| silent < FORGET_AFTER);
            if !keep {
                tracing::info!(agent = %name, "agent forgotten after a day's silence");
                forgotten.push(name.clone());
            }
            keep
        });
        forgotten
    }

    /// A claim of `run` by `agent` was granted.
    pub fn claimed(&self, agent: &AgentName, run: RunId, now: DateTime<Utc>) {
        let mut agents = self.agents.lock().expect("agents lock");
        let record = agents.entry(agent.clone()).or_insert_with(|| AgentRecord {
            name: agent.clone(),
            status: None,
            current_runs: Vec::new(),
            last_heartbeat: now,
        });
        record.last_heartbeat = now;
        if !record.current_runs.contains(&run) {
            record.current_runs.push(run);
        }
    }

    /// `agent` is done with `run` (it finished or released it).
    pub fn ended(&self, agent: &AgentName, run: RunId) {
        if let Some(record) = self.agents.lock().expect("agents lock").get_mut(agent) {
            record.current_runs.retain(|held| *held != run);
        }
    }

    /// Every agent, by name, with where it stands at `now`.
    pub fn list(&self, now: DateTime<Utc>) -> Vec<(AgentRecord, AgentState)> {
        self.agents
            .lock()
            .expect("agents lock")
            .values()
            .map(|record| (record.clone(), agent_state(record, now)))
            .collect()
    }

    /// The fleet's totals at `now`, with every state present (0 when none).
    pub fn totals(&self, now: DateTime<Utc>) -> FleetTotals {
        let mut totals = FleetTotals {
            by_state: AgentState::ALL.iter().map(|state| (*state, 0)).collect(),
            ..FleetTotals::default()
        };
        for (record, state) in self.list(now) {
            *totals.by_state.entry(state).or_default() += 1;
            if state == AgentState::Offline {
                continue;
            }
            totals.slots += record
                .status
                .as_ref()
                .map_or(0, |status| u32::from(status.slots));
            totals.busy_slots += u32::from(record.busy_slots());
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimci_proto::Attempt;

    fn status(slots: u16, busy: u16, draining: bool) -> AgentStatus {
        AgentStatus {
            version: "0.1.0".into(),
            slots,
            busy,
            draining,
        }
    }

    fn name(text: &str) -> AgentName {
        AgentName::parse(text).unwrap()
    }

    #[test]
    fn states_follow_heartbeats_claims_and_silence() {
        let agents = Agents::default();
        let start = Utc::now();
        let run = RunId::new();
        let _ = agents.heartbeat(&name("vm-1"), &[], Some(&status(2, 0, false)), start);
        let _ = agents.heartbeat(&name("vm-2"), &[], Some(&status(1, 0, false)), start);
        agents.claimed(&name("vm-1"), run, start);
        let states: Vec<_> = agents.list(start).into_iter().map(|(_, s)| s).collect();
        assert_eq!(states, [AgentState::Busy, AgentState::Idle]);
        let totals = agents.totals(start);
        assert_eq!((totals.slots, totals.busy_slots), (3, 1));
        assert!((totals.saturation() - 1.0 / 3.0).abs() < 1e-9);

        agents.ended(&name("vm-1"), run);
        let _ = agents.heartbeat(&name("vm-2"), &[], Some(&status(1, 0, true)), start);
        let later = start + chrono::Duration::seconds(20);
        let _ = agents.heartbeat(&name("vm-2"), &[], Some(&status(1, 0, true)), later);
        let states: Vec<_> = agents.list(later).into_iter().map(|(_, s)| s).collect();
        assert_eq!(states, [AgentState::Idle, AgentState::Draining]);

        // vm-1 falls silent; vm-2 keeps beating with a lease.
        let much_later = start + chrono::Duration::seconds(45);
        let lease = Lease {
            run_id: RunId::new(),
            attempt: Attempt(1),
        };
        let forgotten = agents.heartbeat(
            &name("vm-2"),
            &[lease],
            Some(&status(1, 1, false)),
            much_later,
        );
        assert!(forgotten.is_empty(), "offline is not forgotten");
        let totals = agents.totals(much_later);
        assert_eq!(totals.by_state[&AgentState::Offline], 1);
        assert_eq!(totals.by_state[&AgentState::Busy], 1);
        assert_eq!(totals.by_state[&AgentState::Idle], 0);
        // The offline agent's slots no longer count.
        assert_eq!((totals.slots, totals.busy_slots), (1, 1));
    }

    #[test]
    fn an_agent_silent_for_a_day_is_forgotten_and_named_once() {
        let agents = Agents::default();
        let start = Utc::now();
        let _ = agents.heartbeat(&name("vm-old"), &[], Some(&status(1, 0, false)), start);
        let almost = start + chrono::Duration::hours(23);
        assert!(
            agents
                .heartbeat(&name("vm-new"), &[], None, almost)
                .is_empty()
        );
        let day_later = start + chrono::Duration::hours(25);
        assert_eq!(
            agents.heartbeat(&name("vm-new"), &[], None, day_later),
            [name("vm-old")]
        );
        assert!(
            agents
                .heartbeat(&name("vm-new"), &[], None, day_later)
                .is_empty()
        );
        let names: Vec<_> = agents
            .list(day_later)
            .into_iter()
            .map(|(record, _)| record.name)
            .collect();
        assert_eq!(names, [name("vm-new")]);
    }

    #[test]
    fn an_empty_fleet_has_every_state_at_zero_and_no_saturation() {
        let totals = Agents::default().totals(Utc::now());
        assert_eq!(totals.by_state.len(), 4);
        assert!(totals.by_state.values().all(|count| *count == 0));
        assert_eq!(totals.saturation(), 0.0);
    }
}
