//! The dbt Cloud Administrative API v2 client, from dbt Labs' published contract: every answer
//! is an envelope `{"status": {...}, "data": ..., "extra": {"pagination": {"count",
//! "total_count"}}}`, lists page with `limit` (at most 100) and `offset`, and requests carry
//! `Authorization: Token <token>`. Rate limits (429) and 5xx answers are retried with
//! exponential backoff (honouring `Retry-After`), never spun on; other 4xx are final.

use std::time::Duration;

use futures::Stream;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::DbtCloudConfig;

/// Requests are sent at most this many times.
const ATTEMPTS: u32 = 6;
/// The API's largest page.
pub const PAGE: usize = 100;
/// Pages read of one list at most: an API (or a proxy before it) that ignored `offset` would
/// otherwise be asked for the same page for ever.
const MAX_PAGES: usize = 1_000;
/// Pages of an environment's newest successful runs searched for one of production.
const PRODUCTION_PAGES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("dbt Cloud request {method} {path} failed: {source}")]
    Http {
        method: Method,
        path: String,
        source: reqwest::Error,
    },
    #[error("dbt Cloud answered {status} to {method} {path}: {message}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("dbt Cloud's answer to {method} {path} is not what its API documents: {detail}")]
    Contract {
        method: Method,
        path: String,
        detail: String,
    },
}

impl CloudError {
    /// dbt Cloud answered 404: the thing asked for does not exist (or not for this token).
    pub fn is_not_found(&self) -> bool {
        matches!(self, CloudError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// dbt Cloud refused this request for good (a 4xx other than a rate limit).
    pub fn is_permanent(&self) -> bool {
        matches!(self, CloudError::Status { status, .. }
            if status.is_client_error() && *status != StatusCode::TOO_MANY_REQUESTS)
    }
}

/// A run's status, as the API numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudStatus {
    Queued,
    Starting,
    Running,
    Success,
    Error,
    Cancelled,
}

impl CloudStatus {
    pub fn from_code(code: i64) -> Option<CloudStatus> {
        Some(match code {
            1 => CloudStatus::Queued,
            2 => CloudStatus::Starting,
            3 => CloudStatus::Running,
            10 => CloudStatus::Success,
            20 => CloudStatus::Error,
            30 => CloudStatus::Cancelled,
            _ => return None,
        })
    }

    pub fn code(self) -> i64 {
        match self {
            CloudStatus::Queued => 1,
            CloudStatus::Starting => 2,
            CloudStatus::Running => 3,
            CloudStatus::Success => 10,
            CloudStatus::Error => 20,
            CloudStatus::Cancelled => 30,
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            CloudStatus::Success | CloudStatus::Error | CloudStatus::Cancelled
        )
    }
}

/// What slimci reads of a run.
#[derive(Debug, Clone, Deserialize)]
pub struct CloudRun {
    pub id: u64,
    pub job_definition_id: Option<u64>,
    #[serde(default)]
    pub environment_id: Option<u64>,
    pub status: i64,
    #[serde(default)]
    pub git_sha: Option<String>,
    #[serde(default)]
    pub git_branch: Option<String>,
    #[serde(default)]
    pub status_humanized: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub href: Option<String>,
    #[serde(default)]
    pub run_steps: Vec<CloudRunStep>,
    /// What the trigger asked for; slimci finds its own runs again by `cause`.
    #[serde(default)]
    pub trigger: Option<CloudRunTrigger>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CloudRunTrigger {
    #[serde(default)]
    pub cause: Option<String>,
    /// A pull request's build: any of these set (the API has used numbers and strings).
    #[serde(default)]
    pub github_pull_request_id: Option<Value>,
    #[serde(default)]
    pub gitlab_merge_request_id: Option<Value>,
    #[serde(default)]
    pub azure_pull_request_id: Option<Value>,
    #[serde(default)]
    pub schema_override: Option<String>,
}

impl CloudRunTrigger {
    /// Whether the run built a pull request, or into a schema other than its job's: dbt Cloud's
    /// CI runs and slimci's own Cloud-routed builds, never production.
    pub fn is_pull_request_build(&self) -> bool {
        let set = |value: &Option<Value>| {
            value
                .as_ref()
                .is_some_and(|value| !(value.is_null() || value == "" || value == 0))
        };
        set(&self.github_pull_request_id)
            || set(&self.gitlab_merge_request_id)
            || set(&self.azure_pull_request_id)
            || self
                .schema_override
                .as_deref()
                .is_some_and(|schema| !schema.is_empty())
    }
}

impl CloudRun {
    pub fn status(&self) -> Option<CloudStatus> {
        CloudStatus::from_code(self.status)
    }

    pub fn cause(&self) -> Option<&str> {
        self.trigger.as_ref()?.cause.as_deref()
    }

    /// When it was created: the API writes `2026-11-30 10:00:00.123456+00:00` (and, in places,
    /// RFC 3339).
    pub fn created(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let text = self.created_at.as_deref()?;
        chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%:z")
            .or_else(|_| chrono::DateTime::parse_from_rfc3339(text))
            .ok()
            .map(|time| time.with_timezone(&chrono::Utc))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CloudRunStep {
    pub index: i64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub status: i64,
    #[serde(default)]
    pub logs: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CloudAccount {
    pub id: u64,
    #[serde(default)]
    pub run_slots: Option<u64>,
}

/// Where production runs in dbt Cloud: one job, or any job of one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Production {
    Job(u64),
    Environment(u64),
}

/// Which answers a request is sent again after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Rate limits, 5xx and lost connections: requests that change nothing.
    Always,
    /// Only rate limits: a 5xx or a lost answer may mean dbt Cloud acted, so the caller looks
    /// before asking again (a trigger).
    RateLimitedOnly,
}

/// The body of `POST jobs/{id}/run/`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trigger {
    pub cause: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub github_pull_request_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gitlab_merge_request_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_override: Option<String>,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    data: Value,
    #[serde(default)]
    extra: Option<Extra>,
}

#[derive(Deserialize)]
struct Extra {
    pagination: Option<Pagination>,
}

#[derive(Deserialize)]
struct Pagination {
    total_count: u64,
}

pub struct CloudClient {
    /// `{api_url}/api/v2/accounts/{account_id}`.
    account_url: String,
    token: String,
    http: reqwest::Client,
    /// First wait before a retry (doubled each time).
    retry_base: Duration,
}

impl CloudClient {
    pub fn new(config: &DbtCloudConfig, token: String) -> CloudClient {
        CloudClient {
            account_url: format!(
                "{}/api/v2/accounts/{}",
                config.api_url.trim_end_matches('/'),
                config.account_id
            ),
            token,
            http: reqwest::Client::builder()
                .user_agent(concat!("slimci/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(60))
                .build()
                .expect("HTTP client"),
            retry_base: Duration::from_millis(500),
        }
    }

    /// `GET accounts/{id}/`: the account, with its run slots where the plan has them.
    pub async fn account(&self) -> Result<CloudAccount, CloudError> {
        self.data(Method::GET, "/", &[], None).await
    }

    /// `GET runs/?...`: every run matching `query`, all pages, oldest first.
    pub async fn runs(&self, query: &[(&str, String)]) -> Result<Vec<CloudRun>, CloudError> {
        let mut runs: Vec<CloudRun> = Vec::new();
        for _ in 0..MAX_PAGES {
            let mut page_query = query.to_vec();
            page_query.push(("limit", PAGE.to_string()));
            page_query.push(("offset", runs.len().to_string()));
            let (data, total) = self.send(Method::GET, "/runs/", &page_query, None).await?;
            let page: Vec<CloudRun> = self.decode(Method::GET, "/runs/", data)?;
            let got = page.len();
            runs.extend(page);
            // The total is the API's; a page shorter than asked is the end even without it.
            if got < PAGE || total.is_some_and(|total| runs.len() as u64 >= total) {
                return Ok(runs);
            }
        }
        Err(CloudError::Contract {
            method: Method::GET,
            path: "/runs/".to_owned(),
            detail: format!(
                "more than {MAX_PAGES} pages of {PAGE} runs (is `offset` being ignored?)"
            ),
        })
    }

    /// The latest (highest id) successful run of production, if any. In an environment, a run
    /// of `ci_job` or one that built a pull request (dbt Cloud's own CI jobs, slimci's
    /// Cloud-routed builds: each in a PR's schema) is not production, whatever job it was.
    pub async fn latest_success(
        &self,
        production: Production,
        ci_job: Option<u64>,
    ) -> Result<Option<CloudRun>, CloudError> {
        let (filter, limit, pages) = match production {
            Production::Job(job) => (("job_definition_id", job.to_string()), 1, 1),
            Production::Environment(environment) => (
                ("environment_id", environment.to_string()),
                PAGE,
                PRODUCTION_PAGES,
            ),
        };
        for page in 0..pages {
            let mut query = vec![
                filter.clone(),
                ("status", CloudStatus::Success.code().to_string()),
                ("order_by", "-id".to_owned()),
                ("limit", limit.to_string()),
                ("offset", (page * limit).to_string()),
            ];
            if let Production::Environment(_) = production {
                query.push(("include_related", "[\"trigger\"]".to_owned()));
            }
            let (data, _) = self.send(Method::GET, "/runs/", &query, None).await?;
            let runs: Vec<CloudRun> = self.decode(Method::GET, "/runs/", data)?;
            let got = runs.len();
            let found = runs.into_iter().find(|run| {
                run.status() == Some(CloudStatus::Success)
                    && match production {
                        Production::Job(job) => run.job_definition_id.is_none_or(|of| of == job),
                        Production::Environment(environment) => {
                            run.environment_id == Some(environment)
                                && (ci_job.is_none() || run.job_definition_id != ci_job)
                                && !run
                                    .trigger
                                    .as_ref()
                                    .is_some_and(CloudRunTrigger::is_pull_request_build)
                        }
                    }
            });
            if found.is_some() || got < limit {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Every run of the account queued, starting or running, all pages.
    pub async fn in_flight(&self) -> Result<Vec<CloudRun>, CloudError> {
        let statuses = [
            CloudStatus::Queued,
            CloudStatus::Starting,
            CloudStatus::Running,
        ]
        .map(|status| status.code().to_string())
        .join(",");
        self.runs(&[("status__in", format!("[{statuses}]"))]).await
    }

    /// The newest page (up to 100) of `job`'s runs, newest first, each with its `trigger`
    /// (which the list leaves out unless asked): where a run slimci triggered a moment ago is.
    pub async fn recent_runs(&self, job: u64) -> Result<Vec<CloudRun>, CloudError> {
        let query = [
            ("job_definition_id", job.to_string()),
            ("include_related", "[\"trigger\"]".to_owned()),
            ("order_by", "-id".to_owned()),
            ("limit", PAGE.to_string()),
        ];
        let (data, _) = self.send(Method::GET, "/runs/", &query, None).await?;
        self.decode(Method::GET, "/runs/", data)
    }

    /// `POST jobs/{job}/run/`, sent again only after a rate limit: after a 5xx or a lost answer
    /// the run may exist, and the caller looks for it (`recent_runs`, by `cause`) before
    /// triggering again.
    pub async fn trigger(&self, job: u64, trigger: &Trigger) -> Result<CloudRun, CloudError> {
        let body = serde_json::to_value(trigger).expect("a trigger serialises");
        let path = format!("/jobs/{job}/run/");
        let response = self
            .request_with(
                Method::POST,
                &path,
                &[],
                Some(&body),
                Resend::RateLimitedOnly,
            )
            .await?;
        let (data, _) = self.open(Method::POST, &path, response).await?;
        self.decode(Method::POST, &path, data)
    }

    /// `GET runs/{id}/`, with its steps and their logs.
    pub async fn run(&self, id: u64) -> Result<CloudRun, CloudError> {
        let query = [("include_related", "[\"run_steps\"]".to_owned())];
        self.data(Method::GET, &format!("/runs/{id}/"), &query, None)
            .await
    }

    /// `POST runs/{id}/cancel/`: asks; the run reports `Cancelled` once it took effect.
    pub async fn cancel(&self, id: u64) -> Result<CloudRun, CloudError> {
        self.data(Method::POST, &format!("/runs/{id}/cancel/"), &[], None)
            .await
    }

    /// `GET runs/{id}/artifacts/{path}` as a stream of its bytes (it is the file, not an
    /// envelope).
    pub async fn artifact(
        &self,
        id: u64,
        path: &str,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Unpin + use<>, CloudError>
    {
        let path = format!("/runs/{id}/artifacts/{path}");
        let response = self.request(Method::GET, &path, &[], None).await?;
        Ok(Box::pin(response.bytes_stream()))
    }

    async fn data<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T, CloudError> {
        let (data, _) = self.send(method.clone(), path, query, body).await?;
        self.decode(method, path, data)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        data: Value,
    ) -> Result<T, CloudError> {
        serde_json::from_value(data).map_err(|error| CloudError::Contract {
            method,
            path: path.to_owned(),
            detail: error.to_string(),
        })
    }

    /// Sends a request and opens its envelope: its `data`, and the pagination's total count.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(Value, Option<u64>), CloudError> {
        let response = self.request(method.clone(), path, query, body).await?;
        self.open(method, path, response).await
    }

    /// An answer's envelope: its `data`, and the pagination's total count.
    async fn open(
        &self,
        method: Method,
        path: &str,
        response: reqwest::Response,
    ) -> Result<(Value, Option<u64>), CloudError> {
        let text = response.text().await.map_err(|source| CloudError::Http {
            method: method.clone(),
            path: path.to_owned(),
            source,
        })?;
        let envelope: Envelope =
            serde_json::from_str(&text).map_err(|error| CloudError::Contract {
                method,
                path: path.to_owned(),
                detail: format!("not an envelope ({error}): {}", clip(&text)),
            })?;
        let total = envelope
            .extra
            .and_then(|extra| extra.pagination)
            .map(|pagination| pagination.total_count);
        Ok((envelope.data, total))
    }

    /// Sends until an answer is a success or final; returns the successful response.
    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<reqwest::Response, CloudError> {
        self.request_with(method, path, query, body, Resend::Always)
            .await
    }

    async fn request_with(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        resend: Resend,
    ) -> Result<reqwest::Response, CloudError> {
        let mut wait = self.retry_base;
        let mut attempt = 1;
        loop {
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.account_url))
                .header("authorization", format!("Token {}", self.token))
                .header("accept", "application/json")
                .query(query);
            if let Some(body) = body {
                request = request.json(body);
            }
            let retry_after = match request.send().await {
                Err(source) => {
                    if attempt >= ATTEMPTS || resend == Resend::RateLimitedOnly {
                        return Err(CloudError::Http {
                            method,
                            path: path.to_owned(),
                            source,
                        });
                    }
                    tracing::warn!(%source, %path, attempt, "dbt Cloud unreachable; retrying");
                    None
                }
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(|secs| Duration::from_secs(secs.min(60)));
                    let text = response.text().await.unwrap_or_default();
                    let retryable = status == StatusCode::TOO_MANY_REQUESTS
                        || (status.is_server_error() && resend == Resend::Always);
                    if !retryable || attempt >= ATTEMPTS {
                        return Err(CloudError::Status {
                            method,
                            path: path.to_owned(),
                            status,
                            message: user_message(&text),
                        });
                    }
                    tracing::warn!(%status, %path, attempt, "dbt Cloud asked us to retry");
                    retry_after
                }
            };
            tokio::time::sleep(retry_after.unwrap_or(wait).max(wait)).await;
            wait = (wait * 2).min(Duration::from_secs(30));
            attempt += 1;
        }
    }
}

/// The envelope's `status.user_message` of an error answer, or its start.
fn user_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|value| {
            let status = value.get("status")?;
            let message = status
                .get("user_message")
                .or_else(|| status.get("developer_message"))?;
            message.as_str().map(str::to_owned)
        })
        .unwrap_or_else(|| clip(text))
}

fn clip(text: &str) -> String {
    text.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_the_apis_numbers() {
        for status in [
            CloudStatus::Queued,
            CloudStatus::Starting,
            CloudStatus::Running,
            CloudStatus::Success,
            CloudStatus::Error,
            CloudStatus::Cancelled,
        ] {
            assert_eq!(CloudStatus::from_code(status.code()), Some(status));
        }
        assert_eq!(CloudStatus::from_code(10), Some(CloudStatus::Success));
        assert_eq!(CloudStatus::from_code(4), None);
        assert!(CloudStatus::Cancelled.is_finished() && !CloudStatus::Running.is_finished());
    }

    #[test]
    fn a_trigger_for_a_pull_request_or_another_schema_is_not_production() {
        let trigger = |json: &str| -> CloudRunTrigger { serde_json::from_str(json).unwrap() };
        for pull_request in [
            r#"{"cause": "PR", "github_pull_request_id": 7}"#,
            r#"{"cause": "MR", "gitlab_merge_request_id": "12"}"#,
            r#"{"cause": "PR", "azure_pull_request_id": 3}"#,
            r#"{"cause": "slimci run", "schema_override": "pr_shop_7"}"#,
        ] {
            assert!(
                trigger(pull_request).is_pull_request_build(),
                "{pull_request}"
            );
        }
        for production in [
            r#"{"cause": "Scheduled"}"#,
            r#"{"cause": "API", "github_pull_request_id": null, "schema_override": ""}"#,
            r#"{"cause": "API", "github_pull_request_id": 0, "gitlab_merge_request_id": ""}"#,
        ] {
            assert!(!trigger(production).is_pull_request_build(), "{production}");
        }
    }

    #[test]
    fn error_answers_give_the_users_message() {
        let body = r#"{"status": {"code": 404, "is_success": false, "user_message": "The requested resource could not be found.", "developer_message": ""}, "data": null}"#;
        assert_eq!(
            user_message(body),
            "The requested resource could not be found."
        );
        assert_eq!(
            user_message("<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
    }
}
