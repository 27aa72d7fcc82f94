//! The GitHub REST client: commit statuses, the PR comment, a PR's state. It retries rate
//! limits (429, or 403 with `x-ratelimit-remaining: 0`) and 5xx answers with backoff, and
//! authenticates with a token, or as a GitHub App: a JWT signed with the app's key is exchanged
//! for an installation token, renewed five minutes before it expires.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use slimci_proto::PrNumber;
use tokio::sync::Mutex;

use super::render::{COMMENT_MARKER, CommitStatus};
use crate::config::GitHubAuth;

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
    /// Requests sent again since `take_retries` last asked (for the metrics).
    retries: std::sync::atomic::AtomicU64,
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
            retries: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many requests were sent again since the last call.
    pub fn take_retries(&self) -> u64 {
        self.retries.swap(0, std::sync::atomic::Ordering::Relaxed)
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
            self.retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

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
