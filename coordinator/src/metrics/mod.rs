//! The coordinator's metrics: what an autoscaler and an on-call engineer ask of the fleet.
//! `Metrics` holds the counters and histograms the coordinator's parts record as things
//! happen; `render` adds the gauges read from the store and the agents registry at that moment
//! (queue, fleet, finished runs) and writes everything as Prometheus text for `GET /metrics`.
//! With OTLP export on, `Metrics::mirror` sends the same counters and histograms to the
//! collector and `otlp_gauges` the gauges (`crate::telemetry`).
//!
//! Names and meanings are listed in README "Observability"; each is defined once, here.

pub mod registry;

use std::fmt::Write;

use chrono::Utc;
use slimci_proto::{AgentName, CacheReport, Outcome, RunKind};

use crate::agents::AgentState;
use crate::app::AppState;
use crate::rules::RunStatus;
use crate::store::StoreError;
pub use registry::{Counter, Gauge, Histogram, Samples};

/// Seconds, for waits and durations: 1 s to 2 h.
const SECONDS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];
/// Seconds, for phases: 50 ms to 30 min.
const PHASE_SECONDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// dbt nodes per run.
const NODES: &[f64] = &[
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

const KINDS: [RunKind; 4] = [
    RunKind::Ci,
    RunKind::Deploy,
    RunKind::Teardown,
    RunKind::Publish,
];
/// Kinds an agent builds.
const BUILT_KINDS: [RunKind; 3] = [RunKind::Ci, RunKind::Deploy, RunKind::Teardown];
const PHASES: [slimci_proto::Phase; 7] = [
    slimci_proto::Phase::Checkout,
    slimci_proto::Phase::StateFetch,
    slimci_proto::Phase::Deps,
    slimci_proto::Phase::Profile,
    slimci_proto::Phase::Build,
    slimci_proto::Phase::Upload,
    slimci_proto::Phase::SeedParse,
];

/// What a webhook delivery came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// It made, cancelled or tore down runs, or was otherwise acted on.
    Accepted,
    /// Its delivery id was seen before (GitHub redelivers).
    Duplicate,
    /// Its signature did not match the secret.
    Forged,
    /// A valid delivery slimci has nothing to do with (another event, a repository not
    /// configured here, a ping).
    Ignored,
    /// Signed, but not a payload slimci could read (answered 400).
    Invalid,
    /// slimci failed handling it (answered 5xx; its id is forgotten, so a redelivery is
    /// processed).
    Failed,
}

impl WebhookOutcome {
    const ALL: [WebhookOutcome; 6] = [
        WebhookOutcome::Accepted,
        WebhookOutcome::Duplicate,
        WebhookOutcome::Forged,
        WebhookOutcome::Ignored,
        WebhookOutcome::Invalid,
        WebhookOutcome::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Accepted => "accepted",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::Forged => "forged",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::Invalid => "invalid",
            WebhookOutcome::Failed => "failed",
        }
    }
}

/// The counters and histograms, recorded as things happen.
pub struct Metrics {
    pub queue_wait: Histogram,
    pub run_duration: Histogram,
    pub supersedes: Counter,
    pub cancels: Counter,
    pub leases_lost: Counter,
    pub retries: Counter,
    pub dead_lettered: Counter,
    pub webhooks: Counter,
    pub github_failures: Counter,
    pub github_retries: Counter,
    pub dbt_nodes: Histogram,
    pub dbt_parses: Counter,
    pub cache_lookups: Counter,
    pub phase_duration: Histogram,
    pub slot_busy: Counter,
    pub oom_kills: Counter,
    pub pids_limit_hits: Counter,
}

const RUNS_FINISHED: Gauge = Gauge::new(
    "slimci_runs_finished_total",
    "Runs that reached a terminal status, by kind and status, since the database was created.",
    &["kind", "result"],
);
const QUEUE_WAITING: Gauge = Gauge::new(
    "slimci_queue_runs_waiting",
    "Runs queued and not yet claimed by an agent, per repository.",
    &["repository"],
);
const QUEUE_OLDEST: Gauge = Gauge::new(
    "slimci_queue_oldest_wait_seconds",
    "How long the oldest queued run of the repository has waited (0 when none waits).",
    &["repository"],
);
const RUNS_RUNNING: Gauge = Gauge::new(
    "slimci_runs_running",
    "Runs claimed by an agent and not finished, by kind.",
    &["kind"],
);
const AGENTS: Gauge = Gauge::new(
    "slimci_agents",
    "Agents by state: idle, busy, draining, offline (silent for 30 s).",
    &["state"],
);
const SLOTS: Gauge = Gauge::new(
    "slimci_slots",
    "Build slots of the agents that are not offline.",
    &[],
);
const SLOTS_BUSY: Gauge = Gauge::new("slimci_slots_busy", "Slots building now.", &[]);
const SATURATION: Gauge = Gauge::new(
    "slimci_fleet_saturation",
    "Busy slots over slots (0 without agents): near 1, runs queue behind the fleet.",
    &[],
);
const AGENTS_CONSUMING: Gauge = Gauge::new(
    "slimci_jobs_queue_consumers",
    "Consumers of the jobs queue as RabbitMQ last said (agents with a free slot).",
    &[],
);
/// Every value read when asked, in the order `/metrics` lists them.
const GAUGES: [&Gauge; 9] = [
    &RUNS_FINISHED,
    &RUNS_RUNNING,
    &QUEUE_WAITING,
    &QUEUE_OLDEST,
    &AGENTS,
    &SLOTS,
    &SLOTS_BUSY,
    &SATURATION,
    &AGENTS_CONSUMING,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            queue_wait: Histogram::new(
                "slimci_queue_wait_seconds",
                "From a run's request to its first attempt's claim by an agent.",
                &["kind"],
                SECONDS,
            ),
            run_duration: Histogram::new(
                "slimci_run_duration_seconds",
                "From a built run's claim to its end, by kind.",
                &["kind"],
                SECONDS,
            ),
            supersedes: Counter::new(
                "slimci_supersedes_total",
                "Runs superseded by a newer commit of their pull request.",
                &[],
            ),
            cancels: Counter::new(
                "slimci_cancels_total",
                "Cancels requested (API, CLI, closed pull requests).",
                &[],
            ),
            leases_lost: Counter::new(
                "slimci_leases_lost_total",
                "Attempts lost by their agent: lease expired, or released at shutdown.",
                &["reason"],
            ),
            retries: Counter::new(
                "slimci_attempt_retries_total",
                "Lost attempts queued again as a new attempt.",
                &[],
            ),
            dead_lettered: Counter::new(
                "slimci_dead_lettered_total",
                "Messages put on a dead-letter queue: given-up jobs, undecodable events.",
                &["queue"],
            ),
            webhooks: Counter::new(
                "slimci_webhook_deliveries_total",
                "GitHub webhook deliveries by outcome.",
                &["outcome"],
            ),
            github_failures: Counter::new(
                "slimci_github_report_failures_total",
                "Reports to GitHub that failed: transient ones are retried next round.",
                &["kind"],
            ),
            github_retries: Counter::new(
                "slimci_github_request_retries_total",
                "GitHub API requests sent again after a 429, a rate-limit 403 or a 5xx.",
                &[],
            ),
            dbt_nodes: Histogram::new(
                "slimci_dbt_nodes_per_run",
                "dbt nodes per finished build: built, failed, or deferred to production.",
                &["outcome"],
                NODES,
            ),
            dbt_parses: Counter::new(
                "slimci_dbt_parses_total",
                "How dbt parsed the project: partial (a saved parse was reused) or full.",
                &["mode"],
            ),
            cache_lookups: Counter::new(
                "slimci_cache_lookups_total",
                "What the agents' caches gave a build: git (hit, fetched), state (hit, downloaded), deps (hit, installed).",
                &["cache", "result"],
            ),
            phase_duration: Histogram::new(
                "slimci_phase_duration_seconds",
                "How long each phase of a build took on its agent.",
                &["phase"],
                PHASE_SECONDS,
            ),
            slot_busy: Counter::new(
                "slimci_agent_slot_busy_seconds_total",
                "Seconds the agent's slots held an attempt.",
                &["agent"],
            ),
            oom_kills: Counter::new(
                "slimci_sandbox_oom_kills_total",
                "Build processes the kernel killed for the sandbox's memory limit.",
                &["agent"],
            ),
            pids_limit_hits: Counter::new(
                "slimci_sandbox_pids_limit_hits_total",
                "Forks the sandbox's pids limit refused.",
                &["agent"],
            ),
        };
        for kind in BUILT_KINDS {
            metrics.queue_wait.seed(&[kind.as_str()]);
            metrics.run_duration.seed(&[kind.as_str()]);
        }
        metrics.supersedes.seed(&[]);
        metrics.cancels.seed(&[]);
        for reason in ["expired", "released"] {
            metrics.leases_lost.seed(&[reason]);
        }
        metrics.retries.seed(&[]);
        for queue in ["jobs", "events"] {
            metrics.dead_lettered.seed(&[queue]);
        }
        for outcome in WebhookOutcome::ALL {
            metrics.webhooks.seed(&[outcome.as_str()]);
        }
        for kind in ["transient", "permanent"] {
            metrics.github_failures.seed(&[kind]);
        }
        metrics.github_retries.seed(&[]);
        for outcome in ["built", "failed", "deferred"] {
            metrics.dbt_nodes.seed(&[outcome]);
        }
        for mode in ["partial", "full", "unknown"] {
            metrics.dbt_parses.seed(&[mode]);
        }
        for (cache, result) in [
            ("git", "hit"),
            ("git", "fetched"),
            ("state", "hit"),
            ("state", "downloaded"),
            ("deps", "hit"),
            ("deps", "installed"),
        ] {
            metrics.cache_lookups.seed(&[cache, result]);
        }
        for phase in PHASES {
            metrics.phase_duration.seed(&[phase.as_str()]);
        }
        metrics
    }

    pub fn webhook(&self, outcome: WebhookOutcome) {
        self.webhooks.inc(&[outcome.as_str()]);
    }

    /// An agent's report of the caches a build used.
    pub fn caches(&self, report: &CacheReport) {
        for (cache, result) in [
            ("git", &report.git),
            ("state", &report.state),
            ("deps", &report.deps),
        ] {
            if let Some(result) = result {
                self.cache_lookups.inc(&[cache, result]);
            }
        }
        if let Some(mode) = &report.parse {
            self.dbt_parses.inc(&[mode]);
        }
    }

    /// An attempt's end as its agent reported it.
    pub fn attempt_finished(&self, agent: &AgentName, outcome: &Outcome) {
        let summary = slimci_client::summarize(&outcome.nodes);
        let failed = outcome
            .nodes
            .iter()
            .filter(|node| slimci_client::is_failure(node))
            .count();
        self.dbt_nodes.observe(&["built"], f64::from(summary.built));
        self.dbt_nodes.observe(&["failed"], failed as f64);
        self.dbt_nodes
            .observe(&["deferred"], outcome.deferred.len() as f64);
        if let Some(usage) = &outcome.usage {
            self.attempt_usage(agent, usage);
        }
    }

    pub fn attempt_usage(&self, agent: &AgentName, usage: &slimci_proto::AttemptUsage) {
        let agent = [agent.as_str()];
        self.slot_busy.add(&agent, usage.slot_busy_s);
        self.oom_kills.add(&agent, usage.oom_kills as f64);
        self.pids_limit_hits
            .add(&agent, usage.pids_limit_hits as f64);
    }

    /// Drops the per-agent series of `agent`, which the agents registry forgot (an autoscaled
    /// VM long gone), so `/metrics` does not grow with every VM there ever was. The OTLP
    /// mirror keeps its own series; an exporter's cumulative counters are not trimmed.
    pub fn forget_agent(&self, agent: &AgentName) {
        let agent = [agent.as_str()];
        for counter in [&self.slot_busy, &self.oom_kills, &self.pids_limit_hits] {
            counter.remove(&agent);
        }
    }

    /// Every counter and histogram, for `telemetry` to mirror to OTLP.
    pub fn counters(&self) -> [&Counter; 13] {
        [
            &self.supersedes,
            &self.cancels,
            &self.leases_lost,
            &self.retries,
            &self.dead_lettered,
            &self.webhooks,
            &self.github_failures,
            &self.github_retries,
            &self.dbt_parses,
            &self.cache_lookups,
            &self.slot_busy,
            &self.oom_kills,
            &self.pids_limit_hits,
        ]
    }

    pub fn histograms(&self) -> [&Histogram; 4] {
        [
            &self.queue_wait,
            &self.run_duration,
            &self.dbt_nodes,
            &self.phase_duration,
        ]
    }
}

/// The gauges of this moment: queue and runs from the store, fleet from the agents registry.
pub struct GaugeSamples {
    pub families: Vec<(&'static Gauge, Samples)>,
}

/// Reads the gauges now. Every configured repository, kind, status and agent state has a
/// series, at 0 when nothing is there.
pub async fn gauges_now(state: &AppState) -> Result<GaugeSamples, StoreError> {
    let now_ms = crate::store::now_ms();
    let queue = state.store.queue_by_repository().await?;
    let mut repositories: Vec<String> = state
        .config
        .repositories
        .iter()
        .map(|repository| repository.name.as_str().to_owned())
        .collect();
    for (repository, ..) in &queue {
        if !repositories.contains(repository) {
            repositories.push(repository.clone());
        }
    }
    let mut waiting = Vec::new();
    let mut oldest = Vec::new();
    for repository in repositories {
        let found = queue.iter().find(|(name, ..)| *name == repository);
        let (count, oldest_ms) =
            found.map_or((0, None), |(_, count, oldest)| (*count, Some(*oldest)));
        waiting.push((vec![repository.clone()], count as f64));
        let wait_s = oldest_ms.map_or(0.0, |created| (now_ms - created).max(0) as f64 / 1000.0);
        oldest.push((vec![repository], wait_s));
    }

    let counts = state.store.runs_by_kind_and_status().await?;
    let count_of = |kind: RunKind, status: RunStatus| {
        counts
            .iter()
            .find(|(k, s, _)| *k == kind && *s == status)
            .map_or(0, |(.., count)| *count) as f64
    };
    let mut finished = Vec::new();
    let mut running = Vec::new();
    for kind in KINDS {
        for status in RunStatus::ALL
            .into_iter()
            .filter(|status| status.is_terminal())
        {
            finished.push((
                vec![kind.as_str().to_owned(), status.as_str().to_owned()],
                count_of(kind, status),
            ));
        }
        if kind != RunKind::Publish {
            running.push((
                vec![kind.as_str().to_owned()],
                count_of(kind, RunStatus::Running),
            ));
        }
    }

    let fleet = state.agents.totals(Utc::now());
    let agents = AgentState::ALL
        .iter()
        .map(|agent_state| {
            (
                vec![agent_state.as_str().to_owned()],
                f64::from(fleet.by_state.get(agent_state).copied().unwrap_or(0)),
            )
        })
        .collect();
    let consuming = state
        .fleet
        .agents_consuming()
        .map(|count| vec![(Vec::new(), f64::from(count))])
        .unwrap_or_default();
    Ok(GaugeSamples {
        families: vec![
            (&RUNS_FINISHED, finished),
            (&RUNS_RUNNING, running),
            (&QUEUE_WAITING, waiting),
            (&QUEUE_OLDEST, oldest),
            (&AGENTS, agents),
            (&SLOTS, vec![(Vec::new(), f64::from(fleet.slots))]),
            (&SLOTS_BUSY, vec![(Vec::new(), f64::from(fleet.busy_slots))]),
            (&SATURATION, vec![(Vec::new(), fleet.saturation())]),
            (&AGENTS_CONSUMING, consuming),
        ],
    })
}

/// How often the gauges are read for OTLP export.
const OTLP_GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// What OTLP export of the metrics holds on to: the gauges' instruments (their callbacks read
/// the last samples, refreshed by a task every `OTLP_GAUGE_REFRESH`).
pub struct OtlpGauges {
    _gauges: Vec<opentelemetry::metrics::ObservableGauge<f64>>,
    _counters: Vec<opentelemetry::metrics::ObservableCounter<f64>>,
}

/// Sends every metric to `meter` too: counters and histograms as they are recorded, gauges
/// as last read.
pub fn export_to(
    state: &std::sync::Arc<AppState>,
    meter: &opentelemetry::metrics::Meter,
) -> OtlpGauges {
    for counter in state.metrics.counters() {
        counter.mirror(meter);
    }
    for histogram in state.metrics.histograms() {
        histogram.mirror(meter);
    }
    type Shared = std::sync::Arc<std::sync::Mutex<Vec<(&'static str, Samples)>>>;
    let last: Shared = Default::default();
    let observe = |gauge: &'static Gauge, last: Shared| {
        move |observer: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            let last = last.lock().expect("gauge samples lock");
            let Some((_, samples)) = last.iter().find(|(name, _)| *name == gauge.name) else {
                return;
            };
            for (values, value) in samples {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                observer.observe(*value, &registry::attributes(gauge.labels, &values));
            }
        }
    };
    let mut gauges = Vec::new();
    let mut counters = Vec::new();
    for gauge in GAUGES {
        if gauge.is_counter() {
            counters.push(
                meter
                    .f64_observable_counter(registry::otel_name(gauge.name))
                    .with_description(gauge.help)
                    .with_callback(observe(gauge, last.clone()))
                    .build(),
            );
        } else {
            gauges.push(
                meter
                    .f64_observable_gauge(registry::otel_name(gauge.name))
                    .with_description(gauge.help)
                    .with_callback(observe(gauge, last.clone()))
                    .build(),
            );
        }
    }
    let reading = state.clone();
    tokio::spawn(async move {
        loop {
            match gauges_now(&reading).await {
                Ok(read) => {
                    *last.lock().expect("gauge samples lock") = read
                        .families
                        .into_iter()
                        .map(|(gauge, samples)| (gauge.name, samples))
                        .collect();
                }
                Err(error) => tracing::warn!(%error, "cannot read the gauges for OTLP"),
            }
            tokio::select! {
                () = reading.shutdown.cancelled() => return,
                () = tokio::time::sleep(OTLP_GAUGE_REFRESH) => {}
            }
        }
    });
    OtlpGauges {
        _gauges: gauges,
        _counters: counters,
    }
}

/// Everything, as Prometheus text.
pub async fn render(state: &AppState) -> Result<String, StoreError> {
    let gauges = gauges_now(state).await?;
    let mut out = String::with_capacity(16 * 1024);
    for (gauge, samples) in &gauges.families {
        gauge.render(&mut out, samples);
    }
    for counter in state.metrics.counters() {
        counter.render(&mut out);
    }
    for histogram in state.metrics.histograms() {
        histogram.render(&mut out);
    }
    let _ = writeln!(
        out,
        "# HELP slimci_coordinator_info The coordinator's version.\n# TYPE slimci_coordinator_info gauge\nslimci_coordinator_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_counts_its_nodes_and_its_agents_usage() {
        let metrics = Metrics::new();
        let node = |id: &str, status: &str| slimci_proto::NodeResult {
            unique_id: id.into(),
            resource_type: id.split('.').next().unwrap().into(),
            status: status.into(),
            execution_time_s: 0.1,
            message: None,
            failures: None,
            relation: None,
            adapter_response: None,
            started_at: None,
            completed_at: None,
        };
        let outcome = Outcome {
            result: slimci_proto::RunResult::Failed,
            message: None,
            dbt_exit_code: Some(1),
            nodes: vec![
                node("model.shop.a", "success"),
                node("model.shop.b", "success"),
                node("model.shop.c", "error"),
                node("test.shop.d", "pass"),
            ],
            deferred: vec!["model.shop.z".into()],
            usage: Some(slimci_proto::AttemptUsage {
                slot_busy_s: 12.5,
                oom_kills: 1,
                pids_limit_hits: 0,
            }),
        };
        let agent = AgentName::parse("vm-1").unwrap();
        metrics.attempt_finished(&agent, &outcome);
        assert_eq!(metrics.dbt_nodes.count_and_sum(&["built"]), (1, 2.0));
        assert_eq!(metrics.dbt_nodes.count_and_sum(&["failed"]), (1, 1.0));
        assert_eq!(metrics.dbt_nodes.count_and_sum(&["deferred"]), (1, 1.0));
        assert_eq!(metrics.slot_busy.value(&["vm-1"]), 12.5);
        assert_eq!(metrics.oom_kills.value(&["vm-1"]), 1.0);
    }

    #[test]
    fn a_forgotten_agents_series_are_dropped_and_the_others_kept() {
        let metrics = Metrics::new();
        let usage = slimci_proto::AttemptUsage {
            slot_busy_s: 3.0,
            oom_kills: 1,
            pids_limit_hits: 2,
        };
        let gone = AgentName::parse("vm-gone").unwrap();
        let kept = AgentName::parse("vm-kept").unwrap();
        metrics.attempt_usage(&gone, &usage);
        metrics.attempt_usage(&kept, &usage);
        metrics.forget_agent(&gone);
        let mut out = String::new();
        for counter in [
            &metrics.slot_busy,
            &metrics.oom_kills,
            &metrics.pids_limit_hits,
        ] {
            counter.render(&mut out);
        }
        assert!(!out.contains("vm-gone"), "{out}");
        assert_eq!(out.matches("agent=\"vm-kept\"").count(), 3, "{out}");
        assert_eq!(metrics.pids_limit_hits.value(&["vm-kept"]), 2.0);
    }
}
