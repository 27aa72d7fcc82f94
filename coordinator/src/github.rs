//! Results on GitHub: a commit status per run and one comment per pull request, updated in
//! place. A notifier compares each run's status with what GitHub was last told
//! (`runs.github_reported`) and catches up, so a coordinator restart or a GitHub outage delays
//! reports but never loses or blocks them; builds never wait for GitHub.
//!
//! The REST client retries rate limits (429, or 403 with `x-ratelimit-remaining: 0`) and 5xx
//! answers with backoff. It authenticates with a token, or as a GitHub App: a JWT signed with
//! the app's key is exchanged for an installation token, renewed five minutes before it expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use slimci_proto::{NodeResult, PrNumber, RunKind};
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, Summary, summarize};
use crate::config::GitHubAuth;
use crate::rules::RunStatus;
use crate::store::Run;

/// Hidden marker that identifies slimci's comment on a PR.
pub const COMMENT_MARKER: &str = "<!-- slimci:summary -->";
/// GitHub refuses comments over 65,536 characters; stay well under.
const MAX_COMMENT_CHARS: usize = 60_000;
/// GitHub truncates status descriptions at 140 characters.
const MAX_DESCRIPTION_CHARS: usize = 140;
const ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    #[error("GitHub request {method} {path} failed: {source}")]
    Http {
        method: Method,
        path: String,
        source: reqwest::Error,
    },
    #[error("GitHub answered {status} to {method} {path}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("cannot sign the GitHub App JWT: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

impl GitHubError {
    /// GitHub refused this request for good (a 4xx other than a rate limit): asking again
    /// cannot help, unlike a network error, a 5xx or a rate limit after the retries.
    pub fn is_permanent(&self) -> bool {
        self.status().is_some_and(|status| {
            status.is_client_error()
                && status != StatusCode::TOO_MANY_REQUESTS
                && status != StatusCode::FORBIDDEN
        })
    }

    fn status(&self) -> Option<StatusCode> {
        match self {
            GitHubError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

struct CachedToken {
    token: String,
    renew_at: Instant,
}

pub struct GitHub {
    api_url: String,
    auth: GitHubAuth,
    http: reqwest::Client,
    pub status_context: String,
    installations: Mutex<HashMap<String, u64>>,
    tokens: Mutex<HashMap<u64, CachedToken>>,
    /// First wait before a retry (doubled each time); short in tests.
    retry_base: Duration,
}

#[derive(Deserialize)]
struct InstallationToken {
    token: String,
    expires_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Deserialize)]
struct Comment {
    id: u64,
    #[serde(default)]
    body: String,
}

impl GitHub {
    pub fn new(api_url: &str, auth: GitHubAuth, status_context: String) -> GitHub {
        GitHub {
            api_url: api_url.trim_end_matches('/').to_owned(),
            auth,
            http: reqwest::Client::builder()
                .user_agent(concat!("slimci/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            status_context,
            installations: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            retry_base: Duration::from_millis(500),
        }
    }

    fn app_jwt(app_id: u64, private_key_pem: &[u8]) -> Result<String, GitHubError> {
        #[derive(serde::Serialize)]
        struct Claims {
            iat: i64,
            exp: i64,
            iss: String,
        }
        let now = chrono::Utc::now().timestamp();
        // Backdated a minute for clock drift; GitHub accepts at most ten minutes of validity.
        let claims = Claims {
            iat: now - 60,
            exp: now + 540,
            iss: app_id.to_string(),
        };
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem)?;
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )?)
    }

    /// The bearer token for calls about `full_name`.
    async fn token(&self, full_name: &str) -> Result<String, GitHubError> {
        let (app_id, key, configured_installation) = match &self.auth {
            GitHubAuth::Token(token) => return Ok(token.clone()),
            GitHubAuth::App {
                app_id,
                private_key_pem,
                installation_id,
            } => (*app_id, private_key_pem, *installation_id),
        };
        let installation = match configured_installation {
            Some(id) => id,
            None => {
                let known = self.installations.lock().await.get(full_name).copied();
                match known {
                    Some(id) => id,
                    None => {
                        let jwt = Self::app_jwt(app_id, key)?;
                        let found = self
                            .send(
                                Method::GET,
                                &format!("/repos/{full_name}/installation"),
                                None,
                                &jwt,
                            )
                            .await?;
                        let id = found["id"].as_u64().ok_or_else(|| GitHubError::Status {
                            method: Method::GET,
                            path: format!("/repos/{full_name}/installation"),
                            status: StatusCode::OK,
                            body: "no installation id in the answer".to_owned(),
                        })?;
                        self.installations
                            .lock()
                            .await
                            .insert(full_name.to_owned(), id);
                        id
                    }
                }
            }
        };
        let mut tokens = self.tokens.lock().await;
        if let Some(cached) = tokens.get(&installation)
            && Instant::now() < cached.renew_at
        {
            return Ok(cached.token.clone());
        }
        let jwt = Self::app_jwt(app_id, key)?;
        let path = format!("/app/installations/{installation}/access_tokens");
        let answer = self.send(Method::POST, &path, None, &jwt).await?;
        let issued: InstallationToken =
            serde_json::from_value(answer).map_err(|error| GitHubError::Status {
                method: Method::POST,
                path: path.clone(),
                status: StatusCode::OK,
                body: format!("not an installation token: {error}"),
            })?;
        let lifetime = (issued.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        let renew_at = Instant::now() + lifetime.saturating_sub(Duration::from_secs(300));
        tokens.insert(
            installation,
            CachedToken {
                token: issued.token.clone(),
                renew_at,
            },
        );
        tracing::info!(installation, "GitHub App installation token issued");
        Ok(issued.token)
    }

    /// One REST call with retries on rate limits, 5xx and network errors.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: &str,
    ) -> Result<Value, GitHubError> {
        let mut wait = self.retry_base;
        let mut attempt = 1;
        loop {
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.api_url))
                .bearer_auth(token)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28");
            if let Some(body) = body {
                request = request.json(body);
            }
            let outcome = request.send().await;
            let retry_after = match outcome {
                Err(source) => {
                    if attempt >= ATTEMPTS {
                        return Err(GitHubError::Http {
                            method,
                            path: path.to_owned(),
                            source,
                        });
                    }
                    tracing::warn!(%source, %path, attempt, "GitHub unreachable; retrying");
                    None
                }
                Ok(response) => {
                    let status = response.status();
                    let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
                        || (status == StatusCode::FORBIDDEN
                            && response
                                .headers()
                                .get("x-ratelimit-remaining")
                                .is_some_and(|v| v == "0"));
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    if status.is_success() {
                        let text = response.text().await.unwrap_or_default();
                        return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
                    }
                    let body = response.text().await.unwrap_or_default();
                    if !(rate_limited || status.is_server_error()) || attempt >= ATTEMPTS {
                        return Err(GitHubError::Status {
                            method,
                            path: path.to_owned(),
                            status,
                            body,
                        });
                    }
                    tracing::warn!(%status, %path, attempt, "GitHub asked us to retry");
                    retry_after
                }
            };
            tokio::time::sleep(retry_after.unwrap_or(wait).min(Duration::from_secs(60))).await;
            wait *= 2;
            attempt += 1;
        }
    }

    async fn call(
        &self,
        method: Method,
        full_name: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, GitHubError> {
        let token = self.token(full_name).await?;
        self.send(method, path, body, &token).await
    }

    pub async fn set_status(
        &self,
        full_name: &str,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), GitHubError> {
        let body = serde_json::json!({
            "state": status.state,
            "description": status.description,
            "target_url": status.target_url,
            "context": self.status_context,
        });
        self.call(
            Method::POST,
            full_name,
            &format!("/repos/{full_name}/statuses/{sha}"),
            Some(&body),
        )
        .await?;
        Ok(())
    }

    /// Updates slimci's comment on the PR, creating it the first time. `known` is the id
    /// remembered from last time; without it (or if it was deleted) the comment is found by
    /// its marker, so there is never a second one.
    pub async fn upsert_comment(
        &self,
        full_name: &str,
        pr: PrNumber,
        body: &str,
        known: Option<u64>,
    ) -> Result<u64, GitHubError> {
        let payload = serde_json::json!({ "body": body });
        let mut existing = known;
        if existing.is_none() {
            existing = self.find_comment(full_name, pr).await?;
        }
        if let Some(id) = existing {
            let path = format!("/repos/{full_name}/issues/comments/{id}");
            match self
                .call(Method::PATCH, full_name, &path, Some(&payload))
                .await
            {
                Ok(_) => return Ok(id),
                Err(error) if error.status() == Some(StatusCode::NOT_FOUND) && known.is_some() => {
                    // Deleted by someone: look again, then create.
                    if let Some(found) = self.find_comment(full_name, pr).await? {
                        let path = format!("/repos/{full_name}/issues/comments/{found}");
                        self.call(Method::PATCH, full_name, &path, Some(&payload))
                            .await?;
                        return Ok(found);
                    }
                }
                Err(error) => return Err(error),
            }
        }
        let created = self
            .call(
                Method::POST,
                full_name,
                &format!("/repos/{full_name}/issues/{pr}/comments"),
                Some(&payload),
            )
            .await?;
        Ok(created["id"].as_u64().unwrap_or_default())
    }

    async fn find_comment(
        &self,
        full_name: &str,
        pr: PrNumber,
    ) -> Result<Option<u64>, GitHubError> {
        for page in 1..=50 {
            let path = format!("/repos/{full_name}/issues/{pr}/comments?per_page=100&page={page}");
            let answer = self.call(Method::GET, full_name, &path, None).await?;
            let comments: Vec<Comment> = serde_json::from_value(answer).unwrap_or_default();
            if let Some(comment) = comments
                .iter()
                .find(|comment| comment.body.contains(COMMENT_MARKER))
            {
                return Ok(Some(comment.id));
            }
            if comments.len() < 100 {
                break;
            }
        }
        Ok(None)
    }

    /// `open`, `closed`, or none when GitHub does not know the PR.
    pub async fn pull_request_state(
        &self,
        full_name: &str,
        pr: PrNumber,
    ) -> Result<Option<String>, GitHubError> {
        match self
            .call(
                Method::GET,
                full_name,
                &format!("/repos/{full_name}/pulls/{pr}"),
                None,
            )
            .await
        {
            Ok(answer) => Ok(answer["state"].as_str().map(str::to_owned)),
            Err(error) if error.status() == Some(StatusCode::NOT_FOUND) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// A commit status as GitHub takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    pub state: &'static str,
    pub description: String,
    pub target_url: String,
}

fn truncate(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(limit.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn seconds(run: &Run) -> Option<u64> {
    Some(((run.finished_ms? - run.started_ms?).max(0) as f64 / 1000.0).round() as u64)
}

/// "14 built, 2 tests failed, 38 deferred, 92 s".
pub fn result_line(summary: &Summary, deferred: usize, seconds: Option<u64>) -> String {
    let mut parts = vec![format!("{} built", summary.built)];
    if summary.tests_failed > 0 {
        parts.push(format!("{} tests failed", summary.tests_failed));
    } else {
        parts.push(format!("{} tests passed", summary.tests_passed));
    }
    if summary.errored > 0 {
        parts.push(format!("{} errors", summary.errored));
    }
    if summary.skipped > 0 {
        parts.push(format!("{} skipped", summary.skipped));
    }
    parts.push(format!("{deferred} deferred"));
    if let Some(seconds) = seconds {
        parts.push(format!("{seconds} s"));
    }
    parts.join(", ")
}

/// The commit status for a run in its current state.
pub fn commit_status(
    run: &Run,
    nodes: &[NodeResult],
    queue_position: Option<u32>,
    run_url: &str,
) -> CommitStatus {
    let summary = summarize(nodes);
    let line = result_line(&summary, run.deferred.len(), seconds(run));
    let (state, description) = match run.status {
        RunStatus::Queued => (
            "pending",
            match queue_position {
                Some(position) => format!("queued, position {position}"),
                None => "queued".to_owned(),
            },
        ),
        RunStatus::Running if run.superseded_by.is_some() => {
            ("pending", "superseded; stopping the build".to_owned())
        }
        RunStatus::Running => (
            "pending",
            format!("building on {}", run.agent.as_deref().unwrap_or("an agent")),
        ),
        RunStatus::Success => ("success", line),
        RunStatus::Failed => ("failure", line),
        RunStatus::Superseded => (
            "error",
            "superseded by a newer commit of this pull request".to_owned(),
        ),
        RunStatus::Cancelled => (
            "error",
            format!(
                "cancelled: {}",
                run.message.as_deref().unwrap_or("by request")
            ),
        ),
        RunStatus::TimedOut => ("error", format!("timed out after {} s", run.timeout_secs)),
        RunStatus::Error => (
            "error",
            run.message.clone().unwrap_or_else(|| "error".to_owned()),
        ),
    };
    let description = match run.kind {
        RunKind::Deploy => format!("deploy: {description}"),
        _ => description,
    };
    CommitStatus {
        state,
        description: truncate(&description, MAX_DESCRIPTION_CHARS),
        target_url: run_url.to_owned(),
    }
}

fn icon(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Success => "✅",
        RunStatus::Failed => "❌",
        RunStatus::Queued | RunStatus::Running => "⏳",
        _ => "⚠️",
    }
}

fn short(text: &str) -> &str {
    &text[..12.min(text.len())]
}

/// The PR comment for the PR's latest run. Bounded by GitHub's size limit: lists are cut with a
/// link to the full run.
pub fn comment_body(run: &Run, nodes: &[NodeResult], run_url: &str, logs_url: &str) -> String {
    use std::fmt::Write;
    let summary = summarize(nodes);
    let sha = run
        .sha
        .as_ref()
        .map(|sha| short(sha.as_str()).to_owned())
        .unwrap_or_default();
    let mut body = String::new();
    let _ = writeln!(body, "{COMMENT_MARKER}");
    let _ = writeln!(
        body,
        "### {} slimci: dbt Slim CI {} for `{sha}`",
        icon(run.status),
        run.status.as_str()
    );
    let _ = writeln!(body);
    match run.status {
        RunStatus::Queued | RunStatus::Running => {
            let _ = writeln!(
                body,
                "Building `state:modified+` of `{sha}`… this comment updates when it ends."
            );
        }
        _ => {
            let _ = writeln!(
                body,
                "**{}**",
                result_line(&summary, run.deferred.len(), seconds(run))
            );
        }
    }
    if let Some(message) = &run.message {
        let _ = writeln!(body, "\n> {}", message.lines().next().unwrap_or_default());
    }
    if let Some(stamp) = &run.compared_against {
        let _ = writeln!(
            body,
            "\nCompared against production state: deploy run `{}` of commit `{}`.",
            stamp.deploy_run_id,
            short(stamp.sha.as_str())
        );
    }
    let failures: Vec<&NodeResult> = nodes
        .iter()
        .filter(|node| matches!(node.status.as_str(), "fail" | "error" | "runtime error"))
        .collect();
    let mut tail = String::new();
    let _ = writeln!(
        tail,
        "\n[Full run]({run_url}) · [log]({logs_url}) · run `{}`",
        run.id
    );
    let budget = MAX_COMMENT_CHARS.saturating_sub(body.len() + tail.len() + 200);
    let mut sections = String::new();
    if !failures.is_empty() {
        let _ = writeln!(
            sections,
            "\n#### Failures\n\n| node | status | message |\n|---|---|---|"
        );
        for node in &failures {
            let message = node
                .message
                .as_deref()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .replace('|', "\\|");
            let _ = writeln!(
                sections,
                "| `{}` | {} | {} |",
                node.unique_id,
                node.status,
                truncate(&message, 300)
            );
        }
    }
    let built: Vec<&NodeResult> = nodes
        .iter()
        .filter(|node| node.status == "success")
        .collect();
    if !built.is_empty() {
        let _ = writeln!(
            sections,
            "\n<details><summary>{} nodes built</summary>\n",
            built.len()
        );
        for node in &built {
            let _ = writeln!(
                sections,
                "- `{}` ({:.1} s)",
                node.unique_id, node.execution_time_s
            );
        }
        let _ = writeln!(sections, "\n</details>");
    }
    if !run.deferred.is_empty() {
        let _ = writeln!(
            sections,
            "\n<details><summary>{} parents deferred to production</summary>\n",
            run.deferred.len()
        );
        for parent in &run.deferred {
            let _ = writeln!(sections, "- `{parent}`");
        }
        let _ = writeln!(sections, "\n</details>");
    }
    if sections.len() > budget {
        let mut cut: String = sections.chars().take(budget).collect();
        if let Some(line_end) = cut.rfind('\n') {
            cut.truncate(line_end);
        }
        sections = format!("{cut}\n\n…truncated: the full list is in the [run]({run_url}).\n");
    }
    body.push_str(&sections);
    body.push_str(&tail);
    body
}

/// Reports runs to GitHub until shutdown.
pub async fn notifier_loop(state: Arc<AppState>, github: Arc<GitHub>, shutdown: CancellationToken) {
    let mut changes = state.changes.subscribe();
    loop {
        if let Err(error) = report_pending(&state, &github).await {
            tracing::warn!(%error, "GitHub reporting failed; will try again");
        }
        let wait = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(wait);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = &mut wait => {}
            change = changes.recv() => {
                if matches!(change, Err(broadcast::error::RecvError::Closed)) {
                    return;
                }
                // Let a burst of changes settle into one round.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changes.try_recv().is_ok() {}
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    GitHub(#[from] GitHubError),
}

async fn report_pending(state: &AppState, github: &GitHub) -> Result<(), ReportError> {
    for run in state.store.runs_to_report(200).await? {
        match report_run(state, github, &run).await {
            Ok(()) => {
                tracing::info!(run = %run.id, status = run.status.as_str(), "reported to GitHub")
            }
            // One run GitHub refuses for good (an unknown commit, a repository the token cannot
            // see) must not hold up the others: say so once and move on.
            Err(ReportError::GitHub(error)) if error.is_permanent() => {
                tracing::warn!(run = %run.id, status = run.status.as_str(), %error, "GitHub refused this report; not retrying it");
            }
            // GitHub is down or limiting us: stop this round, the next one starts over.
            Err(error) => return Err(error),
        }
        state.store.set_reported(run.id, run.status).await?;
    }
    Ok(())
}

/// Sets the commit status of `run` and, for CI runs, the PR's comment.
async fn report_run(state: &AppState, github: &GitHub, run: &Run) -> Result<(), ReportError> {
    let Some(full_name) = state
        .config
        .repository(run.repository.as_str())
        .and_then(|repository| repository.github.clone())
    else {
        return Ok(());
    };
    let Some(sha) = &run.sha else { return Ok(()) };
    let run_url = format!("{}/api/v1/runs/{}", state.public_url, run.id);
    let logs_url = format!("{run_url}/logs");
    let nodes = state.store.nodes(run.id).await?;
    let position = state.store.queue_position(run).await?;
    github
        .set_status(
            &full_name,
            sha.as_str(),
            &commit_status(run, &nodes, position, &logs_url),
        )
        .await?;
    if let (RunKind::Ci, Some(pr)) = (run.kind, run.pr) {
        // The comment always shows the PR's latest run, whichever run changed.
        let latest = state
            .store
            .latest_ci_run(&run.repository, pr)
            .await?
            .unwrap_or(run.clone());
        let latest_nodes = if latest.id == run.id {
            nodes
        } else {
            state.store.nodes(latest.id).await?
        };
        let latest_url = format!("{}/api/v1/runs/{}", state.public_url, latest.id);
        let body = comment_body(
            &latest,
            &latest_nodes,
            &latest_url,
            &format!("{latest_url}/logs"),
        );
        let known = state.store.comment_id(&run.repository, pr).await?;
        let id = github.upsert_comment(&full_name, pr, &body, known).await?;
        if known != Some(id) {
            state
                .store
                .set_comment_id(&run.repository, pr, Some(id))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimci_proto::{Attempt, RepoName, RunId, Sha};

    fn run(status: RunStatus) -> Run {
        Run {
            id: RunId::new(),
            repository: RepoName::parse("shop").unwrap(),
            kind: RunKind::Ci,
            pr: Some(PrNumber(4)),
            sha: Some(Sha::parse(&"ab".repeat(20)).unwrap()),
            fetch_ref: "refs/pull/4/head".into(),
            isolation: None,
            status,
            message: None,
            attempt: Attempt(1),
            agent: Some("vm-1".into()),
            created_ms: 0,
            started_ms: Some(1_000),
            finished_ms: Some(93_000),
            timeout_secs: 600,
            compared_against: Some(crate::store::ProductionStamp {
                deploy_run_id: RunId::new(),
                sha: Sha::parse(&"cd".repeat(20)).unwrap(),
                manifest_sha256: "ef".repeat(32),
            }),
            progress_done: 0,
            progress_total: 0,
            last_seq: 0,
            cancel_requested: false,
            dbt_exit_code: Some(1),
            superseded_by: None,
            deferred: (0..38).map(|n| format!("model.shop.parent_{n}")).collect(),
            github_reported: None,
            dispatched: true,
            sandbox: None,
            caches: None,
        }
    }

    fn node(id: &str, status: &str, message: Option<&str>) -> NodeResult {
        NodeResult {
            unique_id: id.into(),
            resource_type: id.split('.').next().unwrap().into(),
            status: status.into(),
            execution_time_s: 0.5,
            message: message.map(Into::into),
            failures: None,
            relation: None,
        }
    }

    #[test]
    fn only_client_errors_other_than_rate_limits_are_permanent() {
        let status = |code: u16| GitHubError::Status {
            method: Method::POST,
            path: "/repos/a/b/statuses/x".into(),
            status: StatusCode::from_u16(code).unwrap(),
            body: String::new(),
        };
        assert!(status(422).is_permanent(), "an unknown commit");
        assert!(
            status(404).is_permanent(),
            "a repository the token cannot see"
        );
        assert!(!status(429).is_permanent());
        assert!(
            !status(403).is_permanent(),
            "a rate limit may still be behind a 403"
        );
        assert!(!status(502).is_permanent());
    }

    #[test]
    fn statuses_say_what_happened() {
        let mut nodes: Vec<NodeResult> = (0..14)
            .map(|n| node(&format!("model.shop.m{n}"), "success", None))
            .collect();
        nodes.push(node("test.shop.t1", "fail", Some("Got 5 results")));
        nodes.push(node("test.shop.t2", "fail", Some("Got 1 result")));
        let status = commit_status(&run(RunStatus::Failed), &nodes, None, "http://c/r");
        assert_eq!(status.state, "failure");
        assert_eq!(
            status.description,
            "14 built, 2 tests failed, 38 deferred, 92 s"
        );
        assert_eq!(
            commit_status(&run(RunStatus::Queued), &[], Some(3), "u").description,
            "queued, position 3"
        );
        let superseded = commit_status(&run(RunStatus::Superseded), &[], None, "u");
        assert_eq!(
            (
                superseded.state,
                superseded.description.contains("superseded")
            ),
            ("error", true)
        );
        let long = Run {
            message: Some("x".repeat(500)),
            ..run(RunStatus::Error)
        };
        assert_eq!(
            commit_status(&long, &[], None, "u")
                .description
                .chars()
                .count(),
            140
        );
    }

    #[test]
    fn the_comment_has_the_marker_failures_and_production_state() {
        let nodes = vec![
            node("model.shop.a", "success", None),
            node("test.shop.t", "fail", Some("Got 5 | results")),
        ];
        let body = comment_body(
            &run(RunStatus::Failed),
            &nodes,
            "http://c/r",
            "http://c/r/logs",
        );
        assert!(body.starts_with(COMMENT_MARKER));
        assert!(
            body.contains("| `test.shop.t` | fail | Got 5 \\| results |"),
            "{body}"
        );
        assert!(body.contains("38 parents deferred to production"));
        assert!(body.contains("Compared against production state: deploy run"));
        assert!(body.contains("[Full run](http://c/r)"));
    }

    #[test]
    fn the_comment_stays_under_githubs_limit() {
        let nodes: Vec<NodeResult> = (0..20_000)
            .map(|n| {
                node(
                    &format!("test.shop.a_rather_long_test_name_{n}"),
                    "fail",
                    Some(&"why ".repeat(50)),
                )
            })
            .collect();
        let body = comment_body(
            &run(RunStatus::Failed),
            &nodes,
            "http://c/r",
            "http://c/r/logs",
        );
        assert!(body.chars().count() < 65_536, "{}", body.len());
        assert!(body.contains("…truncated: the full list is in the [run](http://c/r)"));
        assert!(
            body.contains("[Full run](http://c/r)"),
            "the link to the full run survives the cut"
        );
    }

    #[test]
    fn app_jwts_are_rs256_and_name_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let status = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let jwt = GitHub::app_jwt(4242, &std::fs::read(&key).unwrap()).unwrap();
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
        let payload = jwt.split('.').nth(1).unwrap();
        use base64_payload::decode;
        let claims: Value = serde_json::from_slice(&decode(payload)).unwrap();
        assert_eq!(claims["iss"], "4242");
        assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 600);
    }

    /// Base64url without padding, for reading a JWT's claims in the test.
    mod base64_payload {
        pub fn decode(text: &str) -> Vec<u8> {
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut bits = 0u32;
            let mut count = 0;
            let mut out = Vec::new();
            for byte in text.bytes() {
                let value = alphabet.iter().position(|&c| c == byte).expect("base64url") as u32;
                bits = (bits << 6) | value;
                count += 6;
                if count >= 8 {
                    count -= 8;
                    out.push((bits >> count) as u8);
                }
            }
            out
        }
    }
}
