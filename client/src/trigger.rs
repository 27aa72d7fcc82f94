//! `Trigger`: who or what asked for a run, recorded by the coordinator where the request came
//! in (a webhook, the API, the `slimci` CLI, the sweeper) and shown on the run's page and in
//! `GET /api/v1/runs/{id}`. A retry is not a trigger: it is another attempt of the same run.

use serde::{Deserialize, Serialize};

/// The `User-Agent` the `slimci` CLI sends (through `Client::new`); the coordinator records a
/// request carrying it as the CLI's.
pub const CLI_USER_AGENT: &str = concat!("slimci/", env!("CARGO_PKG_VERSION"));

/// Longest `User-Agent` kept: it is the caller's text, recorded for people to read.
const USER_AGENT_CHARS: usize = 120;

/// Who or what asked for a run. On the wire: `{"source": "github", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Trigger {
    /// A signed GitHub webhook delivery: a `pull_request` event (its `action`: `opened`,
    /// `synchronize`, `closed`, ...) or a `push` to the production branch (a deploy).
    Github {
        event: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        action: Option<String>,
        /// The login of the event's `sender`, when the payload names one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sender: Option<String>,
        /// `X-GitHub-Delivery`.
        delivery: String,
    },
    /// The `slimci` CLI (`trigger`, `deploy`, `teardown`, `state publish`).
    Cli {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// The HTTP API, called by something other than the CLI.
    Api {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_agent: Option<String>,
    },
    /// The coordinator's sweeper: a teardown of a pull request that is closed (or unknown to
    /// GitHub) and whose isolation was left behind.
    Sweeper,
    /// The coordinator's dbt Cloud production import: a successful run of the production job
    /// (or of a job in the production environment).
    DbtCloud {
        #[serde(default)]
        job: Option<u64>,
        run: u64,
    },
}

impl Trigger {
    /// A request through the API, told apart by its `User-Agent`.
    pub fn from_user_agent(user_agent: Option<&str>) -> Trigger {
        let user_agent = user_agent.map(str::trim).filter(|agent| !agent.is_empty());
        match user_agent.and_then(|agent| agent.strip_prefix("slimci/")) {
            Some(version) => Trigger::Cli {
                version: Some(version.chars().take(USER_AGENT_CHARS).collect()),
            },
            None => Trigger::Api {
                user_agent: user_agent.map(|agent| agent.chars().take(USER_AGENT_CHARS).collect()),
            },
        }
    }

    /// For people: `GitHub push by @octocat`, `the slimci CLI 0.1.0`, ...
    pub fn describe(&self) -> String {
        match self {
            Trigger::Github {
                event,
                action,
                sender,
                ..
            } => {
                let mut text = format!("GitHub webhook: {event}");
                if let Some(action) = action {
                    text.push(' ');
                    text.push_str(action);
                }
                if event == "push" {
                    text.push_str(" to the production branch");
                }
                if let Some(sender) = sender {
                    text.push_str(" by @");
                    text.push_str(sender);
                }
                text
            }
            Trigger::Cli { version } => match version {
                Some(version) => format!("the slimci CLI {version}"),
                None => "the slimci CLI".to_owned(),
            },
            Trigger::Api { user_agent } => match user_agent {
                Some(agent) => format!("the HTTP API ({agent})"),
                None => "the HTTP API".to_owned(),
            },
            Trigger::DbtCloud {
                job: Some(job),
                run,
            } => {
                format!("dbt Cloud's production job {job} (its successful run {run})")
            }
            Trigger::DbtCloud { job: None, run } => {
                format!("dbt Cloud's production environment (its successful run {run})")
            }
            Trigger::Sweeper => {
                "the sweeper (the pull request is closed and its isolation was left behind)"
                    .to_owned()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_agents_tell_the_cli_from_other_callers() {
        assert_eq!(
            Trigger::from_user_agent(Some(CLI_USER_AGENT)),
            Trigger::Cli {
                version: Some(env!("CARGO_PKG_VERSION").to_owned())
            }
        );
        assert_eq!(
            Trigger::from_user_agent(Some("curl/8.5.0")).describe(),
            "the HTTP API (curl/8.5.0)"
        );
        assert_eq!(
            Trigger::from_user_agent(Some("  ")),
            Trigger::Api { user_agent: None }
        );
        let long = "x".repeat(500);
        let Trigger::Api {
            user_agent: Some(kept),
        } = Trigger::from_user_agent(Some(&long))
        else {
            panic!("an API call");
        };
        assert_eq!(kept.len(), USER_AGENT_CHARS);
    }

    #[test]
    fn a_webhook_says_its_event_and_sender_on_the_wire_and_to_people() {
        let push = Trigger::Github {
            event: "push".into(),
            action: None,
            sender: Some("octocat".into()),
            delivery: "d-1".into(),
        };
        assert_eq!(
            push.describe(),
            "GitHub webhook: push to the production branch by @octocat"
        );
        let wire = serde_json::to_value(&push).unwrap();
        assert_eq!(
            wire,
            serde_json::json!({"source": "github", "event": "push", "sender": "octocat", "delivery": "d-1"})
        );
        assert_eq!(serde_json::from_value::<Trigger>(wire).unwrap(), push);
        assert_eq!(
            serde_json::to_value(Trigger::Sweeper).unwrap(),
            serde_json::json!({"source": "sweeper"})
        );
    }
}
