//! Why a queued run has not started yet, and the sentence a follower prints about it.

use serde::{Deserialize, Serialize};

/// Part of the view of a queued run. `agents_consuming` is what RabbitMQ says about the jobs
/// queue (its consumer count, probed every few seconds); it is `null` while the coordinator
/// cannot ask (no broker connection yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// The queue agents take jobs from, `<prefix>.jobs`.
    pub jobs_queue: String,
    pub agents_consuming: Option<u32>,
    /// Queued runs ahead of this one.
    pub runs_ahead: u32,
    pub queued_for_secs: u64,
}

impl Waiting {
    /// One line for people: no agent is there to take the run, or it waits its turn.
    pub fn explain(&self) -> String {
        match self.agents_consuming {
            Some(0) => format!(
                "no agent is connected to the job queue {}; the run starts when one connects (queued for {} s)",
                self.jobs_queue, self.queued_for_secs
            ),
            _ => format!(
                "waiting for an agent: {} run{} ahead, queued for {} s",
                self.runs_ahead,
                if self.runs_ahead == 1 { "" } else { "s" },
                self.queued_for_secs
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(agents_consuming: Option<u32>, runs_ahead: u32) -> Waiting {
        Waiting {
            jobs_queue: "slimci.jobs".into(),
            agents_consuming,
            runs_ahead,
            queued_for_secs: 45,
        }
    }

    #[test]
    fn without_consumers_it_names_the_queue() {
        assert_eq!(
            waiting(Some(0), 3).explain(),
            "no agent is connected to the job queue slimci.jobs; the run starts when one connects (queued for 45 s)"
        );
    }

    #[test]
    fn with_consumers_it_says_how_many_runs_are_ahead() {
        assert_eq!(
            waiting(Some(2), 3).explain(),
            "waiting for an agent: 3 runs ahead, queued for 45 s"
        );
        assert_eq!(
            waiting(Some(1), 1).explain(),
            "waiting for an agent: 1 run ahead, queued for 45 s"
        );
    }

    #[test]
    fn an_unknown_consumer_count_is_not_called_zero() {
        assert_eq!(
            waiting(None, 0).explain(),
            "waiting for an agent: 0 runs ahead, queued for 45 s"
        );
    }
}
