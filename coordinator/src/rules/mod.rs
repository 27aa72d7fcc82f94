//! The coordinator's decisions, as plain functions over plain data: which requests are
//! accepted, which waiting runs go out, who may claim a run, what a cancel does, which agent
//! events apply, and what a finished or lost attempt becomes. No I/O here (no async, no SQL, no
//! sockets); the HTTP, AMQP and SQLite adapters call these and act on the answer.
//!
//! `request`: validating and admitting requests. `dispatch`: superseding on submit, and which
//! waiting runs go to the broker. `claim`: claims, cancels and agent events. `fate`: what a
//! finished or lost attempt becomes, and the messages that say so. `webhook`: pull request
//! actions. `publish`: whether a published body is a dbt manifest. `route`: whether a CI run
//! builds on the fleet or in dbt Cloud.

mod claim;
mod dispatch;
mod fate;
#[cfg(test)]
mod fixtures;
mod publish;
mod request;
mod route;
mod webhook;

pub use claim::{
    CANCELLED_BY_USER, CancelDecision, ClaimDecision, ClaimView, EventDisposition, decide_cancel,
    decide_claim, event_disposition,
};
pub use dispatch::{ActiveRun, Caps, SubmitDecision, decide_submit, dispatch};
pub use fate::{
    Finish, FinishedAttempt, LostAttempt, LostAttemptView, LostReason, decide_finish,
    decide_lost_attempt, superseded_message,
};
pub use publish::{FROM_OUTSIDE, ManifestError, ManifestFacts, check_manifest, published_message};
pub use request::{
    Admission, RequestError, RunRequest, ValidRequest, admit, check_deploys_allowed,
    no_production_state_message, teardown_request, validate_request,
};
pub use route::{Backend, CloudLoad, Route, RouteView, Routing, cloud_room, route};
pub use webhook::{PullRequestAction, pull_request_action};

/// Where a run stands: one definition, shared with the user API (`slimci_client`).
pub use slimci_client::RunStatus;
