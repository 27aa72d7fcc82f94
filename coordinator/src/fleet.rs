//! What the coordinator knows of its agents without asking them: how many consume the jobs
//! queue, as RabbitMQ says (a passive declare of the queue, made by the job publisher every few
//! seconds). A queued run's view uses it to say why the run waits.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the publisher asks RabbitMQ.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// An answer older than this is no answer (the publisher lost the broker).
const TRUSTED_FOR: Duration = Duration::from_secs(30);

/// The last consumer count of the jobs queue and when it was read.
#[derive(Default)]
pub struct Fleet {
    jobs_consumers: Mutex<Option<(u32, Instant)>>,
}

impl Fleet {
    /// Whether the publisher should ask again.
    pub fn probe_due(&self) -> bool {
        self.jobs_consumers
            .lock()
            .expect("fleet lock")
            .is_none_or(|(_, at)| at.elapsed() >= PROBE_EVERY)
    }

    pub fn record_jobs_consumers(&self, count: u32) {
        *self.jobs_consumers.lock().expect("fleet lock") = Some((count, Instant::now()));
    }

    /// Agents consuming the jobs queue, or `None` when RabbitMQ was not asked lately.
    pub fn agents_consuming(&self) -> Option<u32> {
        self.jobs_consumers
            .lock()
            .expect("fleet lock")
            .filter(|(_, at)| at.elapsed() < TRUSTED_FOR)
            .map(|(count, _)| count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_count_is_known_and_not_due_at_once() {
        let fleet = Fleet::default();
        assert!(fleet.probe_due());
        assert_eq!(fleet.agents_consuming(), None);
        fleet.record_jobs_consumers(0);
        assert_eq!(fleet.agents_consuming(), Some(0));
        assert!(!fleet.probe_due());
    }
}
