//! Names of the broker objects both sides declare. They are part of the contract: a coordinator
//! and its agents must agree on them, and on the arguments they are declared with.

/// Queue and exchange names under one prefix, so several deployments (or test runs) can share a
/// broker without seeing each other's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Topology {
        Topology {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Durable queue of [`crate::ToAgentMessage`]s; agents consume it with prefetch = slots.
    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// Durable queue of [`crate::AgentEvent`]s; the coordinator consumes it.
    pub fn events_queue(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Fanout exchange of [`crate::ControlMessage`]s; each agent binds a private queue to it.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// Direct exchange that rejected messages go to, routed by the name of the queue they left.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    /// Where unusable jobs end up, with the reason in [`DEAD_REASON_HEADER`].
    pub fn jobs_dead_queue(&self) -> String {
        format!("{}.jobs.dead", self.prefix)
    }

    /// Where unusable events end up, with the reason in [`DEAD_REASON_HEADER`].
    pub fn events_dead_queue(&self) -> String {
        format!("{}.events.dead", self.prefix)
    }
}

/// Header a dead-lettered message carries: why it was refused, for people.
pub const DEAD_REASON_HEADER: &str = "x-slimci-dead-reason";
