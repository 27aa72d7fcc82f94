//! `POST /webhooks/github`: GitHub's `pull_request`, `push` and `ping` events.
//!
//! The raw body is authenticated first (`X-Hub-Signature-256`, HMAC-SHA256 with the configured
//! secret, compared in constant time); anything unsigned or forged gets 401 and changes
//! nothing. A delivery id seen before (`X-GitHub-Delivery`) is answered without being processed
//! again; a delivery slimci failed to handle (5xx) has its id forgotten, so GitHub's
//! redelivery is processed. What each action does is `rules::pull_request_action`; the runs go through
//! `runs::submit`, so the supersede and dedupe rules are the same as for the CLI. The payload's
//! fields become a `ValidRequest` directly (its SHA parsed once), not a `RunRequest` of strings.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use slimci_client::Trigger;
use slimci_proto::{IsolationName, PrNumber, RunKind, Sha};

use super::{ApiError, submission_status};
use crate::app::AppState;
use crate::config::RepositoryConfig;
use crate::metrics::WebhookOutcome;
use crate::rules::{self, PullRequestAction, ValidRequest};
use crate::runs;
use crate::store::PullRequest;

/// Whether `signature` (the header's value, `sha256=<hex>`) is the HMAC of `body` under
/// `secret`. The comparison is constant-time.
pub fn signature_is_valid(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_digest) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

/// Who sent the event (every event GitHub delivers names one).
#[derive(Deserialize)]
struct Sender {
    login: String,
}

#[derive(Deserialize)]
struct Head {
    sha: String,
}

#[derive(Deserialize)]
struct PullRequestPayload {
    #[serde(default)]
    draft: bool,
    state: String,
    head: Head,
}

#[derive(Deserialize)]
struct PullRequestEvent {
    action: String,
    number: u64,
    pull_request: PullRequestPayload,
    repository: Repository,
    #[serde(default)]
    sender: Option<Sender>,
}

#[derive(Deserialize)]
struct PushEvent {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
    #[serde(default)]
    sender: Option<Sender>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn answer(
    status: StatusCode,
    message: impl Into<String>,
    run: Option<slimci_proto::RunId>,
) -> Response {
    (
        status,
        Json(serde_json::json!({ "message": message.into(), "run": run })),
    )
        .into_response()
}

pub async fn github_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(secret) = &state.secrets.github_webhook_secret else {
        return Err(ApiError::NotFound(
            "GitHub webhooks are not configured here: set [github] webhook_secret in the coordinator's configuration".to_owned(),
        ));
    };
    let delivery = header(&headers, "x-github-delivery")
        .unwrap_or("-")
        .to_owned();
    let signature = header(&headers, "x-hub-signature-256");
    if !signature.is_some_and(|signature| signature_is_valid(secret.as_bytes(), &body, signature)) {
        tracing::warn!(%delivery, signed = signature.is_some(), "refused a GitHub webhook with a missing or wrong signature");
        state.metrics.webhook(WebhookOutcome::Forged);
        return Err(ApiError::Unauthorized);
    }
    let event = header(&headers, "x-github-event")
        .ok_or_else(|| ApiError::BadRequest("missing X-GitHub-Event header".to_owned()))?
        .to_owned();
    if delivery == "-" {
        return Err(ApiError::BadRequest(
            "missing X-GitHub-Delivery header".to_owned(),
        ));
    }
    if !state.store.record_delivery(&delivery, &event).await? {
        tracing::info!(%delivery, %event, "replayed webhook delivery; not processed again");
        state.metrics.webhook(WebhookOutcome::Duplicate);
        return Ok(answer(
            StatusCode::OK,
            format!("delivery {delivery} was already processed"),
            None,
        ));
    }
    let handled = match event.as_str() {
        "ping" => Ok(answer(StatusCode::OK, "pong", None)),
        "pull_request" => pull_request(&state, &body, &delivery).await,
        "push" => push(&state, &body, &delivery).await,
        other => Ok(answer(
            StatusCode::ACCEPTED,
            format!("`{other}` events are not used by slimci; nothing done"),
            None,
        )),
    };
    tracing::info!(%delivery, %event, ok = handled.is_ok(), "GitHub webhook");
    let outcome = outcome(&event, &handled);
    if outcome == WebhookOutcome::Failed {
        // Answered 5xx, so GitHub redelivers (or someone presses "Redeliver"): the delivery
        // id must not make that redelivery a duplicate. Recorded before handling (so two
        // concurrent copies are not both processed), it is forgotten again here.
        if let Err(error) = state.store.forget_delivery(&delivery).await {
            tracing::error!(%delivery, %error, "could not forget a webhook delivery that failed; its redelivery will be taken for a duplicate");
        }
    }
    state.metrics.webhook(outcome);
    handled
}

/// What a handled delivery came to: `Failed` when slimci itself failed (a 5xx, worth
/// redelivering), `Invalid` only when the request was at fault.
fn outcome(event: &str, handled: &Result<Response, ApiError>) -> WebhookOutcome {
    match handled {
        Ok(response) if event != "ping" && response.status() != StatusCode::ACCEPTED => {
            WebhookOutcome::Accepted
        }
        Ok(_) => WebhookOutcome::Ignored,
        Err(ApiError::Internal(_)) => WebhookOutcome::Failed,
        Err(_) => WebhookOutcome::Invalid,
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], event: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("not a GitHub `{event}` payload: {error}")))
}

/// The configured repository a payload is about, or the answer that it is not configured here.
fn configured_repository(
    state: &AppState,
    payload: &Repository,
) -> Result<RepositoryConfig, Box<Response>> {
    let full_name = &payload.full_name;
    state.config.repository_for_github(full_name).cloned().ok_or_else(|| {
        Box::new(answer(
            StatusCode::ACCEPTED,
            format!(
                "repository `{full_name}` is not configured here (no [[repository]] with github = \"{full_name}\"); nothing queued"
            ),
            None,
        ))
    })
}

/// The run's trigger: this delivery of `event`.
fn webhook_trigger(
    event: &str,
    action: Option<&str>,
    sender: Option<Sender>,
    delivery: &str,
) -> Trigger {
    Trigger::Github {
        event: event.to_owned(),
        action: action.map(str::to_owned),
        sender: sender.map(|sender| sender.login),
        delivery: delivery.to_owned(),
    }
}

async fn pull_request(state: &AppState, body: &[u8], delivery: &str) -> Result<Response, ApiError> {
    let event: PullRequestEvent = parse(body, "pull_request")?;
    let trigger = webhook_trigger("pull_request", Some(&event.action), event.sender, delivery);
    let repository = match configured_repository(state, &event.repository) {
        Ok(repository) => repository,
        Err(not_configured) => return Ok(*not_configured),
    };
    let pr = PrNumber(event.number);
    let head_sha = parse_sha(&event.pull_request.head.sha)?;
    state
        .store
        .upsert_pull_request(&PullRequest {
            repository: repository.name.clone(),
            pr,
            open: event.pull_request.state == "open",
            draft: event.pull_request.draft,
            head_sha: Some(head_sha.clone()),
        })
        .await?;
    match rules::pull_request_action(
        &event.action,
        event.pull_request.draft,
        repository.build_drafts,
    ) {
        PullRequestAction::Build => {
            let what = format!("CI run of {} for PR #{pr}", head_sha.short());
            let request = pull_request_build(state, &repository, pr, head_sha)?;
            submit(state, request, trigger, what).await
        }
        PullRequestAction::SkipDraft => Ok(answer(
            StatusCode::OK,
            format!(
                "PR #{pr} is a draft and `{}` does not build drafts; not built",
                repository.name
            ),
            None,
        )),
        PullRequestAction::CancelInFlight => {
            let cancelled = runs::cancel_pull_request(
                state,
                &repository,
                pr,
                "the pull request became a draft",
            )
            .await?;
            Ok(answer(
                StatusCode::OK,
                format!("PR #{pr} became a draft; {cancelled} run(s) cancelled"),
                None,
            ))
        }
        PullRequestAction::Close => {
            let cancelled =
                runs::cancel_pull_request(state, &repository, pr, "the pull request was closed")
                    .await?;
            let teardown = runs::teardown(
                state,
                &repository,
                pr,
                trigger,
                &crate::telemetry::Origin::Request,
            )
            .await?;
            Ok(answer(
                StatusCode::CREATED,
                format!(
                    "PR #{pr} closed; {cancelled} run(s) cancelled, its isolation is being dropped"
                ),
                Some(teardown.run.id),
            ))
        }
        PullRequestAction::Ignore => Ok(answer(
            StatusCode::ACCEPTED,
            format!(
                "pull_request action `{}` needs nothing from slimci",
                event.action
            ),
            None,
        )),
    }
}

async fn push(state: &AppState, body: &[u8], delivery: &str) -> Result<Response, ApiError> {
    let event: PushEvent = parse(body, "push")?;
    let repository = match configured_repository(state, &event.repository) {
        Ok(repository) => repository,
        Err(not_configured) => return Ok(*not_configured),
    };
    let production_ref = format!("refs/heads/{}", repository.production_branch);
    if event.git_ref != production_ref || event.deleted {
        return Ok(answer(
            StatusCode::ACCEPTED,
            format!(
                "push to `{}` is not a push to the production branch; nothing queued",
                event.git_ref
            ),
            None,
        ));
    }
    if let Err(off) = rules::check_deploys_allowed(&repository) {
        return Ok(answer(
            StatusCode::ACCEPTED,
            format!("push to the production branch; nothing queued: {off}"),
            None,
        ));
    }
    let sha = parse_sha(&event.after)?;
    let what = format!("deploy of {}", sha.short());
    let request = ValidRequest {
        repository: repository.name.clone(),
        kind: RunKind::Deploy,
        pr: None,
        sha: Some(sha),
        fetch_ref: production_ref,
        isolation: None,
        timeout_secs: runs::run_timeout_secs(&state.config, &repository),
    };
    let trigger = webhook_trigger("push", None, event.sender, delivery);
    submit(state, request, trigger, what).await
}

fn parse_sha(text: &str) -> Result<Sha, ApiError> {
    Sha::parse(text).map_err(|error| ApiError::BadRequest(error.to_string()))
}

/// The CI run of a pull request's head commit: built from `refs/pull/<pr>/head` into the PR's
/// isolation.
fn pull_request_build(
    state: &AppState,
    repository: &RepositoryConfig,
    pr: PrNumber,
    head_sha: Sha,
) -> Result<ValidRequest, ApiError> {
    if pr.0 == 0 {
        return Err(ApiError::BadRequest(
            rules::RequestError::ZeroPr.to_string(),
        ));
    }
    Ok(ValidRequest {
        repository: repository.name.clone(),
        kind: RunKind::Ci,
        pr: Some(pr),
        sha: Some(head_sha),
        fetch_ref: format!("refs/pull/{pr}/head"),
        isolation: Some(IsolationName::for_pr(&repository.name, pr)),
        timeout_secs: runs::run_timeout_secs(&state.config, repository),
    })
}

/// Submits a run for a webhook: 201 with the new run, or 200 with the one already queued or
/// building for the same commit.
async fn submit(
    state: &AppState,
    request: ValidRequest,
    trigger: Trigger,
    what: String,
) -> Result<Response, ApiError> {
    let submitted = runs::submit(state, request, trigger).await?;
    Ok(answer(
        submission_status(&submitted),
        what,
        Some(submitted.run.id),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::rename_table;

    const SECRET: &str = "webhook-secret";

    /// A coordinator's shared state over a store in `dir`, with one repository, `shop`, that
    /// is GitHub's `acme/shop`, and traces off.
    async fn state(dir: &std::path::Path) -> Arc<AppState> {
        let path = dir.join("coordinator.toml");
        std::fs::write(
            &path,
            format!(
                r#"
                data_dir = "{data}"
                [amqp]
                url = "amqp://127.0.0.1"
                [auth]
                agent_token = "0123456789abcdef"
                [github]
                webhook_secret = "{SECRET}"
                [[repository]]
                name = "shop"
                clone_url = "/srv/shop.git"
                github = "acme/shop"
                "#,
                data = dir.display()
            ),
        )
        .unwrap();
        let config = crate::config::Config::load(&path).unwrap();
        Arc::new(AppState {
            secrets: config.secrets().unwrap(),
            store: crate::store::Store::open(dir).await.unwrap(),
            logs: Arc::new(crate::logs::LogStore::new(dir.join("logs"), 1 << 20)),
            artifacts: crate::artifacts::ArtifactStore::new(dir.join("artifacts")),
            changes: tokio::sync::broadcast::channel(16).0,
            outbox: Arc::new(tokio::sync::Notify::new()),
            public_url: "http://127.0.0.1:8080".to_owned(),
            dead_jobs: std::sync::Mutex::new(Vec::new()),
            submit_lock: tokio::sync::Mutex::new(()),
            shutdown: tokio_util::sync::CancellationToken::new(),
            fleet: crate::fleet::Fleet::default(),
            agents: crate::agents::Agents::default(),
            metrics: crate::metrics::Metrics::new(),
            telemetry: slimci_telemetry::Telemetry::off(),
            dbt_cloud: crate::dbt_cloud::DbtCloud::from_config(&config).unwrap(),
            config: Arc::new(config),
        })
    }

    /// Delivers a signed `pull_request` event `opened` of PR #4 as delivery `delivery`.
    async fn deliver_opened(state: &Arc<AppState>, delivery: &str) -> Result<Response, ApiError> {
        let body = serde_json::json!({
            "action": "opened",
            "number": 4,
            "pull_request": { "state": "open", "draft": false, "head": { "sha": "ab".repeat(20) } },
            "repository": { "full_name": "acme/shop" },
            "sender": { "login": "octocat" },
        })
        .to_string();
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", "pull_request".parse().unwrap());
        headers.insert("x-github-delivery", delivery.parse().unwrap());
        headers.insert(
            "x-hub-signature-256",
            sign(SECRET.as_bytes(), body.as_bytes()).parse().unwrap(),
        );
        github_webhook(State(state.clone()), headers, Bytes::from(body)).await
    }

    fn all_runs() -> crate::store::RunFilter {
        crate::store::RunFilter {
            limit: 100,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_delivery_that_failed_inside_is_processed_when_github_redelivers_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        // The database fails the first time: the pull request cannot be recorded.
        rename_table(&state.store, "pull_requests", "pull_requests_away").await;
        let failed = deliver_opened(&state, "d-1").await.unwrap_err();
        assert!(matches!(failed, ApiError::Internal(_)), "{failed:?}");
        assert_eq!(
            failed.into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert!(state.store.runs(&all_runs()).await.unwrap().is_empty());
        rename_table(&state.store, "pull_requests_away", "pull_requests").await;

        let redelivered = deliver_opened(&state, "d-1").await.unwrap();
        assert_eq!(redelivered.status(), StatusCode::CREATED);
        let runs = state.store.runs(&all_runs()).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(runs[0].pr, Some(PrNumber(4)));

        let again = deliver_opened(&state, "d-1").await.unwrap();
        assert_eq!(again.status(), StatusCode::OK, "a replay once processed");
        assert_eq!(state.store.runs(&all_runs()).await.unwrap().len(), 1);
        let counted = |outcome| state.metrics.webhooks.value(&[outcome]);
        assert_eq!(
            (
                counted("failed"),
                counted("invalid"),
                counted("accepted"),
                counted("duplicate")
            ),
            (1.0, 0.0, 1.0, 1.0)
        );
    }

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_are_checked_over_the_raw_body() {
        let body = br#"{"zen":"Design for failure."}"#;
        let good = sign(b"s3cret", body);
        assert!(signature_is_valid(b"s3cret", body, &good));
        assert!(!signature_is_valid(b"other", body, &good));
        assert!(!signature_is_valid(b"s3cret", b"{}", &good));
        assert!(!signature_is_valid(
            b"s3cret",
            body,
            good.trim_start_matches("sha256=")
        ));
        assert!(!signature_is_valid(b"s3cret", body, "sha256=zz"));
        assert!(!signature_is_valid(b"s3cret", body, ""));
    }

    #[test]
    fn only_a_request_at_fault_is_invalid_and_an_internal_error_is_failed() {
        let created = || Ok(answer(StatusCode::CREATED, "queued", None));
        assert_eq!(outcome("push", &created()), WebhookOutcome::Accepted);
        assert_eq!(outcome("ping", &created()), WebhookOutcome::Ignored);
        assert_eq!(
            outcome(
                "push",
                &Ok(answer(StatusCode::ACCEPTED, "nothing done", None))
            ),
            WebhookOutcome::Ignored
        );
        assert_eq!(
            outcome("push", &Err(ApiError::BadRequest("not JSON".to_owned()))),
            WebhookOutcome::Invalid
        );
        assert_eq!(
            outcome(
                "pull_request",
                &Err(ApiError::Internal("database is locked".to_owned()))
            ),
            WebhookOutcome::Failed
        );
    }

    #[test]
    fn githubs_documented_example_verifies() {
        // The example from GitHub's "Validating webhook deliveries" documentation.
        let signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_is_valid(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            signature
        ));
    }
}
