//! A fake GitHub REST API for the tests (the real one cannot be reached from here), following
//! GitHub's documented contract for what slimci uses: commit statuses, issue comments, pull
//! requests, and GitHub App installation tokens (the app JWT is verified with the app's public
//! key). It records every request, and can answer with 5xx or rate limits to test retries.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Value,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Fake {
    requests: Vec<Recorded>,
    /// id → (owner/repo, PR, body)
    comments: BTreeMap<u64, (String, u64, String)>,
    next_id: u64,
    pull_states: HashMap<(String, u64), String>,
    /// The next N status requests answer 502.
    fail_statuses: u32,
    /// The next N status requests answer 403 with `x-ratelimit-remaining: 0`.
    rate_limit_statuses: u32,
    /// Tokens the fake accepts for repository calls.
    tokens: Vec<String>,
    /// App id and public key (PEM) of the GitHub App, when one is installed.
    app: Option<(u64, Vec<u8>)>,
    installation_id: u64,
}

type Shared = Arc<Mutex<Fake>>;

pub struct FakeGitHub {
    pub url: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Signs a webhook body the way GitHub does (`X-Hub-Signature-256`).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A `pull_request` webhook payload shaped like GitHub's.
pub fn pull_request_payload(
    full_name: &str,
    action: &str,
    number: u64,
    sha: &str,
    draft: bool,
) -> Value {
    let (owner, name) = full_name.split_once('/').expect("owner/name");
    let state = if action == "closed" { "closed" } else { "open" };
    json!({
        "action": action,
        "number": number,
        "pull_request": {
            "url": format!("https://api.github.com/repos/{full_name}/pulls/{number}"),
            "number": number,
            "state": state,
            "draft": draft,
            "merged": false,
            "title": format!("PR {number}"),
            "head": { "ref": format!("feature-{number}"), "sha": sha },
            "base": { "ref": "main" },
        },
        "repository": { "full_name": full_name, "name": name, "owner": { "login": owner } },
        "sender": { "login": "analyst" },
    })
}

/// A `push` webhook payload shaped like GitHub's.
pub fn push_payload(full_name: &str, git_ref: &str, after: &str) -> Value {
    let (owner, name) = full_name.split_once('/').expect("owner/name");
    json!({
        "ref": git_ref,
        "before": "0".repeat(40),
        "after": after,
        "created": false,
        "deleted": false,
        "forced": false,
        "repository": { "full_name": full_name, "name": name, "owner": { "login": owner } },
        "pusher": { "name": "analyst" },
        "sender": { "login": "analyst" },
    })
}

impl FakeGitHub {
    pub async fn start() -> FakeGitHub {
        let state: Shared = Arc::new(Mutex::new(Fake {
            next_id: 1000,
            installation_id: 77,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", post(create_status))
            .route(
                "/repos/{owner}/{repo}/issues/{number}/comments",
                get(list_comments).post(create_comment),
            )
            .route(
                "/repos/{owner}/{repo}/issues/comments/{id}",
                patch(update_comment),
            )
            .route("/repos/{owner}/{repo}/pulls/{number}", get(get_pull))
            .route("/repos/{owner}/{repo}/installation", get(get_installation))
            .route(
                "/app/installations/{id}/access_tokens",
                post(create_installation_token),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake GitHub");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGitHub { url, state, task }
    }

    /// Accept this personal access token.
    pub fn accept_token(&self, token: &str) {
        self.state.lock().unwrap().tokens.push(token.to_owned());
    }

    /// Install a GitHub App with this id and public key.
    pub fn install_app(&self, app_id: u64, public_key_pem: Vec<u8>) {
        self.state.lock().unwrap().app = Some((app_id, public_key_pem));
    }

    pub fn fail_next_statuses(&self, count: u32) {
        self.state.lock().unwrap().fail_statuses = count;
    }

    pub fn rate_limit_next_statuses(&self, count: u32) {
        self.state.lock().unwrap().rate_limit_statuses = count;
    }

    pub fn set_pull_state(&self, full_name: &str, number: u64, state: &str) {
        self.state
            .lock()
            .unwrap()
            .pull_states
            .insert((full_name.to_owned(), number), state.to_owned());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The statuses posted for `sha`, oldest first.
    pub fn statuses(&self, sha: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|request| {
                request.method == "POST" && request.path.ends_with(&format!("/statuses/{sha}"))
            })
            .map(|request| request.body)
            .collect()
    }

    /// The comments on a PR: (id, body).
    pub fn comments(&self, full_name: &str, number: u64) -> Vec<(u64, String)> {
        self.state
            .lock()
            .unwrap()
            .comments
            .iter()
            .filter(|(_, (repo, pr, _))| repo == full_name && *pr == number)
            .map(|(id, (_, _, body))| (*id, body.clone()))
            .collect()
    }

    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.requests()
            .iter()
            .filter(|request| request.method == method && request.path.contains(path_contains))
            .count()
    }
}

fn record(state: &Shared, method: &str, path: String, body: Value, headers: &HeaderMap) {
    let authorization = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    state.lock().unwrap().requests.push(Recorded {
        method: method.to_owned(),
        path,
        body,
        authorization,
    });
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(
            json!({ "message": message, "documentation_url": "https://docs.github.com/rest" }),
        ),
    )
        .into_response()
}

/// Repository calls need `Authorization: Bearer <token>` with a token the fake issued or knows.
fn authorized(state: &Shared, headers: &HeaderMap) -> bool {
    let token = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("token "))
        });
    token.is_some_and(|token| {
        state
            .lock()
            .unwrap()
            .tokens
            .iter()
            .any(|known| known == token)
    })
}

fn parse_body(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

async fn create_status(
    State(state): State<Shared>,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body = parse_body(&body);
    record(
        &state,
        "POST",
        format!("/repos/{owner}/{repo}/statuses/{sha}"),
        body.clone(),
        &headers,
    );
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Bad credentials");
    }
    {
        let mut fake = state.lock().unwrap();
        if fake.fail_statuses > 0 {
            fake.fail_statuses -= 1;
            return error(StatusCode::BAD_GATEWAY, "Server Error");
        }
        if fake.rate_limit_statuses > 0 {
            fake.rate_limit_statuses -= 1;
            let mut response = error(StatusCode::FORBIDDEN, "API rate limit exceeded");
            let headers = response.headers_mut();
            headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
            headers.insert("retry-after", "1".parse().unwrap());
            return response;
        }
    }
    let valid_state = matches!(
        body["state"].as_str(),
        Some("error" | "failure" | "pending" | "success")
    );
    if !valid_state
        || body["description"]
            .as_str()
            .is_some_and(|d| d.chars().count() > 140)
    {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed");
    }
    (
        StatusCode::CREATED,
        axum::Json(json!({ "id": 1, "state": body["state"], "context": body["context"] })),
    )
        .into_response()
}

async fn list_comments(
    State(state): State<Shared>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    record(
        &state,
        "GET",
        format!("/repos/{owner}/{repo}/issues/{number}/comments"),
        Value::Null,
        &headers,
    );
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Bad credentials");
    }
    let per_page: usize = query
        .get("per_page")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let page: usize = query.get("page").and_then(|v| v.parse().ok()).unwrap_or(1);
    let full_name = format!("{owner}/{repo}");
    let fake = state.lock().unwrap();
    let all: Vec<Value> = fake
        .comments
        .iter()
        .filter(|(_, (r, pr, _))| *r == full_name && *pr == number)
        .map(|(id, (_, _, body))| json!({ "id": id, "body": body, "user": { "login": "slimci[bot]" } }))
        .collect();
    let page: Vec<Value> = all
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    axum::Json(Value::Array(page)).into_response()
}

/// A comment's text, refused (422, with GitHub's message) when it is missing or over 65,536
/// characters.
fn comment_text(body: &Value) -> Result<&str, &'static str> {
    let Some(text) = body["body"].as_str() else {
        return Err("Validation Failed");
    };
    if text.chars().count() > 65_536 {
        return Err("Body is too long (maximum is 65536 characters)");
    }
    Ok(text)
}

async fn create_comment(
    State(state): State<Shared>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body = parse_body(&body);
    record(
        &state,
        "POST",
        format!("/repos/{owner}/{repo}/issues/{number}/comments"),
        body.clone(),
        &headers,
    );
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Bad credentials");
    }
    let text = match comment_text(&body) {
        Ok(text) => text,
        Err(refused) => return error(StatusCode::UNPROCESSABLE_ENTITY, refused),
    };
    let mut fake = state.lock().unwrap();
    fake.next_id += 1;
    let id = fake.next_id;
    fake.comments
        .insert(id, (format!("{owner}/{repo}"), number, text.to_owned()));
    (
        StatusCode::CREATED,
        axum::Json(json!({ "id": id, "body": text })),
    )
        .into_response()
}

async fn update_comment(
    State(state): State<Shared>,
    Path((owner, repo, id)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body = parse_body(&body);
    record(
        &state,
        "PATCH",
        format!("/repos/{owner}/{repo}/issues/comments/{id}"),
        body.clone(),
        &headers,
    );
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Bad credentials");
    }
    let text = match comment_text(&body) {
        Ok(text) => text,
        Err(refused) => return error(StatusCode::UNPROCESSABLE_ENTITY, refused),
    };
    let mut fake = state.lock().unwrap();
    match fake.comments.get_mut(&id) {
        Some(comment) => {
            comment.2 = text.to_owned();
            axum::Json(json!({ "id": id, "body": text })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn get_pull(
    State(state): State<Shared>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
) -> Response {
    record(
        &state,
        "GET",
        format!("/repos/{owner}/{repo}/pulls/{number}"),
        Value::Null,
        &headers,
    );
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Bad credentials");
    }
    let state_of = state
        .lock()
        .unwrap()
        .pull_states
        .get(&(format!("{owner}/{repo}"), number))
        .cloned();
    match state_of {
        Some(pull_state) => {
            axum::Json(json!({ "number": number, "state": pull_state })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// App endpoints need a JWT signed (RS256) with the app's key, issued by the app.
fn app_jwt_valid(state: &Shared, headers: &HeaderMap) -> bool {
    let Some((app_id, public_key)) = state.lock().unwrap().app.clone() else {
        return false;
    };
    let Some(jwt) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(&public_key) else {
        return false;
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iat", "iss"]);
    match jsonwebtoken::decode::<Value>(jwt, &key, &validation) {
        Ok(data) => {
            let claims = data.claims;
            let lifetime =
                claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0);
            claims["iss"]
                .as_str()
                .and_then(|iss| iss.parse::<u64>().ok())
                == Some(app_id)
                && lifetime <= 600
        }
        Err(_) => false,
    }
}

async fn get_installation(
    State(state): State<Shared>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    record(
        &state,
        "GET",
        format!("/repos/{owner}/{repo}/installation"),
        Value::Null,
        &headers,
    );
    if !app_jwt_valid(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
    let id = state.lock().unwrap().installation_id;
    axum::Json(json!({ "id": id, "account": { "login": owner } })).into_response()
}

async fn create_installation_token(
    State(state): State<Shared>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    record(
        &state,
        "POST",
        format!("/app/installations/{id}/access_tokens"),
        Value::Null,
        &headers,
    );
    if !app_jwt_valid(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
    if id != state.lock().unwrap().installation_id {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let token = format!("ghs_{}", uuid::Uuid::new_v4().simple());
    state.lock().unwrap().tokens.push(token.clone());
    let expires_at = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    (StatusCode::CREATED, axum::Json(json!({ "token": token, "expires_at": expires_at, "permissions": { "statuses": "write" } })))
        .into_response()
}
