//! [`Client`]: the user API over HTTP, one method per route, answers as typed views and
//! refusals as [`ClientError::Refused`] carrying the coordinator's message.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use slimci_proto::RunId;

use crate::request::RunRequest;
use crate::sse::LogStream;
use crate::urls::{artifact_url, run_api_url, run_logs_url};
use crate::views::{AgentView, ProductionStateView, RepositoryView, RunView};

/// Why a call failed. The transport errors keep their cause as `source()`; print the chain
/// (`anyhow`'s `{:#}`) to see it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the slimci coordinator at {base}")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// The coordinator answered 4xx or 5xx; `message` is its `error`, or the body.
    #[error("{message} (HTTP {status})")]
    Refused { status: StatusCode, message: String },
    #[error("cannot read the coordinator's answer")]
    Answer(#[source] reqwest::Error),
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A run as `POST /api/v1/runs` answered it.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub run: RunView,
    /// 201: made for this request; 200: the same commit was already queued or building.
    pub created: bool,
}

/// The user API of one coordinator.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `base` is the coordinator's URL (`http://127.0.0.1:8080`); `token` its API token, when
    /// it requires one. The `slimci` CLI's client: it says so in its `User-Agent`
    /// (`CLI_USER_AGENT`), so the runs it asks for are recorded as the CLI's.
    pub fn new(base: &str, token: Option<String>) -> Client {
        let http = reqwest::Client::builder()
            .user_agent(crate::trigger::CLI_USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        Client::with_http(base, token, http)
    }

    /// As [`Client::new`], over `http` (its own deadlines, e.g. a whole-request timeout).
    pub fn with_http(base: &str, token: Option<String>, http: reqwest::Client) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, url: String) -> RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn api(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, format!("{}/api/v1{path}", self.base))
    }

    async fn send(&self, request: RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(json) => json["error"].as_str().unwrap_or("no details").to_owned(),
            Err(_) if !body.trim().is_empty() => body.trim().to_owned(),
            Err(_) => "no details".to_owned(),
        };
        Err(ClientError::Refused { status, message })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(request)
            .await?
            .json()
            .await
            .map_err(ClientError::Answer)
    }

    /// `POST /api/v1/runs`.
    pub async fn create_run(&self, request: &RunRequest) -> Result<Submitted, ClientError> {
        let response = self
            .send(self.api(Method::POST, "/runs").json(request))
            .await?;
        let created = response.status() == StatusCode::CREATED;
        let run = response.json().await.map_err(ClientError::Answer)?;
        Ok(Submitted { run, created })
    }

    /// `GET /api/v1/runs`: the newest runs first (short views).
    pub async fn runs(
        &self,
        repository: Option<&str>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunView>, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        query.extend(repository.map(|repository| ("repository", repository.to_owned())));
        query.extend(status.map(|status| ("status", status.to_owned())));
        self.json(self.api(Method::GET, "/runs").query(&query))
            .await
    }

    /// `GET /api/v1/runs/{id}`: the full view.
    pub async fn run(&self, id: RunId) -> Result<RunView, ClientError> {
        self.json(self.request(Method::GET, run_api_url(&self.base, id)))
            .await
    }

    /// `GET /api/v1/runs/{id}` as the coordinator wrote it, for showing it raw.
    pub async fn run_json(&self, id: RunId) -> Result<serde_json::Value, ClientError> {
        self.json(self.request(Method::GET, run_api_url(&self.base, id)))
            .await
    }

    /// `GET /api/v1/runs/{id}/logs`: the log so far, every attempt.
    pub async fn logs(&self, id: RunId) -> Result<String, ClientError> {
        self.send(self.request(Method::GET, run_logs_url(&self.base, id)))
            .await?
            .text()
            .await
            .map_err(ClientError::Answer)
    }

    /// `GET /api/v1/runs/{id}/logs?follow=true`, resuming after line `resume_after` (0: from
    /// the start).
    pub async fn follow_logs(
        &self,
        id: RunId,
        resume_after: u64,
    ) -> Result<LogStream, ClientError> {
        let request = self
            .request(Method::GET, run_logs_url(&self.base, id))
            .query(&[("follow", "true")])
            .header("Last-Event-ID", resume_after.to_string());
        Ok(LogStream::new(self.send(request).await?))
    }

    /// `POST /api/v1/runs/{id}/cancel`.
    pub async fn cancel(&self, id: RunId) -> Result<RunView, ClientError> {
        self.json(self.request(
            Method::POST,
            format!("{}/cancel", run_api_url(&self.base, id)),
        ))
        .await
    }

    /// `GET /api/v1/runs/{id}/artifacts/{name}`.
    pub async fn artifact(&self, id: RunId, name: &str) -> Result<Vec<u8>, ClientError> {
        let response = self
            .send(self.request(Method::GET, artifact_url(&self.base, id, name)))
            .await?;
        Ok(response
            .bytes()
            .await
            .map_err(ClientError::Answer)?
            .to_vec())
    }

    /// `GET /api/v1/agents`.
    pub async fn agents(&self) -> Result<Vec<AgentView>, ClientError> {
        self.json(self.api(Method::GET, "/agents")).await
    }

    /// `GET /api/v1/repositories`.
    pub async fn repositories(&self) -> Result<Vec<RepositoryView>, ClientError> {
        self.json(self.api(Method::GET, "/repositories")).await
    }

    /// `GET /api/v1/repositories/{name}/production-state`.
    pub async fn production_state(
        &self,
        repository: &str,
    ) -> Result<ProductionStateView, ClientError> {
        let path = format!(
            "/repositories/{}/production-state",
            path_segment(repository)
        );
        self.json(self.api(Method::GET, &path)).await
    }

    /// `POST /api/v1/repositories/{name}/production-state?sha=<sha>`: publishes `manifest`
    /// (dbt's `manifest.json` of a production run made outside slimci, built from commit
    /// `sha`) as the repository's production state; answers the new production state.
    pub async fn publish_production_state(
        &self,
        repository: &str,
        sha: &str,
        manifest: Vec<u8>,
    ) -> Result<ProductionStateView, ClientError> {
        let path = format!(
            "/repositories/{}/production-state",
            path_segment(repository)
        );
        self.json(
            self.api(Method::POST, &path)
                .query(&[("sha", sha)])
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(manifest),
        )
        .await
    }

    /// `POST /api/v1/repositories/{name}/pulls/{pr}/teardown`.
    pub async fn teardown(&self, repository: &str, pr: u64) -> Result<Submitted, ClientError> {
        let path = format!(
            "/repositories/{}/pulls/{pr}/teardown",
            path_segment(repository)
        );
        let response = self.send(self.api(Method::POST, &path)).await?;
        let created = response.status() == StatusCode::CREATED;
        let run = response.json().await.map_err(ClientError::Answer)?;
        Ok(Submitted { run, created })
    }
}

/// A repository name as one path segment.
fn path_segment(name: &str) -> String {
    name.replace('/', "%2F")
}
