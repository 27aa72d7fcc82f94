//! The agent's HTTP calls to the coordinator: claims, heartbeats, artifact uploads, and the
//! authorised downloads of production manifests and parses. Every failure is a `CoordinatorError` saying
//! whether the coordinator did not answer, answered with an HTTP error (and its message), or
//! answered something that is not a protocol message.

use std::time::Duration;

use slimci_proto::{
    AgentName, AgentStatus, Attempt, ClaimRequest, ClaimResponse, DecodeError, HeartbeatRequest,
    HeartbeatResponse, Lease, RunId,
};

/// How long a claim may take before the job goes back to the queue.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a heartbeat may take; the next one comes a third of a lease later.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request did not get an answer (connection refused, timeout, a cut body).
    #[error("the coordinator did not answer: {0}")]
    NoAnswer(#[source] reqwest::Error),
    /// The coordinator answered with an HTTP error.
    #[error("HTTP {status}: {message}")]
    Status {
        status: reqwest::StatusCode,
        /// The coordinator's own words (its JSON `error`, or the body as it came).
        message: String,
    },
    /// The answer is not a protocol message of this version.
    #[error("the coordinator's answer is not a protocol message: {0}")]
    Decode(#[source] DecodeError),
}

/// A client for the coordinator's agent API, with this agent's name and token.
#[derive(Clone)]
pub struct CoordinatorClient {
    http: reqwest::Client,
    base_url: String,
    token: String,
    agent: AgentName,
}

impl CoordinatorClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        token: String,
        agent: AgentName,
    ) -> CoordinatorClient {
        CoordinatorClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            agent,
        }
    }

    /// Asks for the right to build one attempt of a run.
    pub async fn claim(
        &self,
        run_id: RunId,
        attempt: Attempt,
    ) -> Result<ClaimResponse, CoordinatorError> {
        let request = ClaimRequest {
            run_id,
            attempt,
            agent: self.agent.clone(),
        };
        self.call("claim", &request, CLAIM_TIMEOUT).await
    }

    /// Renews the leases of the attempts this agent builds (none: it only says it is there),
    /// and tells the coordinator how the agent stands.
    pub async fn heartbeat(
        &self,
        leases: Vec<Lease>,
        status: AgentStatus,
    ) -> Result<HeartbeatResponse, CoordinatorError> {
        let request = HeartbeatRequest {
            agent: self.agent.clone(),
            leases,
            status: Some(status),
        };
        self.call("heartbeat", &request, HEARTBEAT_TIMEOUT).await
    }

    /// Waits until the coordinator answers an empty heartbeat, which proves its URL and this
    /// agent's token, logging every failure with the next retry; false if `drain` fired first.
    /// An agent that cannot reach the coordinator could claim no job, so it takes none until
    /// then.
    pub async fn wait_until_answering(
        &self,
        status: AgentStatus,
        drain: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let mut failures = 0u32;
        loop {
            let error = tokio::select! {
                answer = self.heartbeat(Vec::new(), status.clone()) => match answer {
                    Ok(_) => break,
                    Err(error) => error,
                },
                () = drain.cancelled() => return false,
            };
            failures += 1;
            let delay = crate::rules::coordinator_retry_delay(failures);
            tracing::warn!(
                url = %self.base_url,
                %error,
                retry_in_s = delay.as_secs(),
                "cannot reach the coordinator; taking no jobs until it answers"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = drain.cancelled() => return false,
            }
        }
        if failures > 0 {
            tracing::info!(url = %self.base_url, failures, "the coordinator answers now");
        }
        true
    }

    /// Stores one of a run's artifacts (`manifest.json`, `run_results.json`) as raw bytes.
    pub async fn upload_artifact(
        &self,
        run_id: RunId,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), CoordinatorError> {
        let url = slimci_client::artifact_url(&self.base_url, run_id, name);
        let response = self
            .http
            .put(&url)
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await
            .map_err(CoordinatorError::NoAnswer)?;
        success(response).await.map(drop)
    }

    /// One of a run's artifacts, or none if the run has no artifact of that name.
    pub async fn download_artifact(
        &self,
        run_id: RunId,
        name: &str,
    ) -> Result<Option<Vec<u8>>, CoordinatorError> {
        let url = slimci_client::artifact_url(&self.base_url, run_id, name);
        match self.download(&url).await {
            Ok(response) => response
                .bytes()
                .await
                .map(|bytes| Some(bytes.to_vec()))
                .map_err(CoordinatorError::NoAnswer),
            Err(CoordinatorError::Status { status, .. })
                if status == reqwest::StatusCode::NOT_FOUND =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// A GET of `url` (the coordinator's, named by a job) with the agent's token; the caller
    /// reads the body as it streams.
    pub async fn download(&self, url: &str) -> Result<reqwest::Response, CoordinatorError> {
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(CoordinatorError::NoAnswer)?;
        success(response).await
    }

    /// Posts a protocol message to the agent API and decodes the versioned answer.
    async fn call<Request: serde::Serialize, Answer: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        request: &Request,
        timeout: Duration,
    ) -> Result<Answer, CoordinatorError> {
        let url = format!("{}/api/v1/agent/{path}", self.base_url);
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(slimci_proto::encode(request))
            .timeout(timeout)
            .send()
            .await
            .map_err(CoordinatorError::NoAnswer)?;
        let body = success(response)
            .await?
            .bytes()
            .await
            .map_err(CoordinatorError::NoAnswer)?;
        slimci_proto::decode::<Answer>(&body).map_err(CoordinatorError::Decode)
    }
}

/// The response if it is a success, else the coordinator's error with its message.
async fn success(response: reqwest::Response) -> Result<reqwest::Response, CoordinatorError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(CoordinatorError::Status {
        status,
        message: server_message(&body),
    })
}

/// The coordinator's API errors are `{"error": "..."}`; anything else is shown as it came.
fn server_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_message_is_its_json_error_or_the_body() {
        assert_eq!(
            server_message(r#"{"error":"run 1 has no attempt 2"}"#),
            "run 1 has no attempt 2"
        );
        assert_eq!(server_message("Bad Gateway\n"), "Bad Gateway");
        assert_eq!(server_message(r#"{"other":1}"#), r#"{"other":1}"#);
    }
}
