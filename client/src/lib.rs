//! The slimci user API (`/api/v1`, see the coordinator's `api` module): the JSON types the
//! coordinator serializes and its clients read, one definition for both sides, and [`Client`], a
//! typed HTTP client with the server-sent-events log follower.
//!
//! Used by the `slimci` CLI and the end-to-end tests; the coordinator uses the types only.

mod backend;
mod client;
mod nodes;
mod request;
mod sse;
mod status;
mod trigger;
mod urls;
mod views;
mod waiting;

pub use backend::Backend;
pub use client::{Client, ClientError, Submitted};
pub use nodes::{FAILURE_STATUSES, is_failure, summarize};
pub use request::RunRequest;
pub use sse::{LogEvent, LogStream, SseEvent, find_event_end, parse_event};
pub use status::RunStatus;
pub use trigger::{CLI_USER_AGENT, Trigger};
pub use urls::{artifact_url, run_api_url, run_logs_url, run_url};
pub use views::{
    AgentView, ArtifactView, LogEnd, PhaseView, ProductionStateView, Progress, RepositoryView,
    RunView, StateView, Summary,
};
pub use waiting::Waiting;
