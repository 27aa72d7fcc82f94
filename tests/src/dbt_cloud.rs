//! A fake dbt Cloud Administrative API v2 for the tests (the real one cannot be reached from
//! here), written from dbt Labs' published contract (the OpenAPI document of v2) for what
//! slimci uses: every answer an envelope `{"status": {...}, "data": ..., "extra": {...}}`,
//! `Authorization: Token <token>`, lists paged by `limit` (at most 100) and `offset`,
//! `GET accounts/{id}/` with `run_slots`, `GET runs/` filtered by `job_definition_id`,
//! `environment_id`, `status`
//! and `status__in` and ordered by `order_by`, `POST jobs/{id}/run/`, `GET runs/{id}/` with
//! `run_steps`, `POST runs/{id}/cancel/` that takes effect after a delay, and
//! `GET runs/{id}/artifacts/{path}`. It records every request and can answer 429 or 5xx for a
//! while, or carry out a trigger and lose its answer. A test plays dbt Cloud's part in a
//! triggered run with `update` (status, steps with their logs, artifacts).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// Run statuses, as the API numbers them.
pub const QUEUED: i64 = 1;
pub const STARTING: i64 = 2;
pub const RUNNING: i64 = 3;
pub const SUCCESS: i64 = 10;
pub const ERROR: i64 = 20;
pub const CANCELLED: i64 = 30;

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Value,
    pub authorization: Option<String>,
}

/// A run the fake holds.
#[derive(Debug, Clone)]
pub struct FakeRun {
    pub id: u64,
    pub job_definition_id: u64,
    pub environment_id: Option<u64>,
    pub status: i64,
    pub git_sha: Option<String>,
    pub git_branch: Option<String>,
    /// What the trigger asked for (`cause`, `schema_override`, ...).
    pub trigger: Value,
    pub steps: Vec<(String, i64, String)>,
    pub artifacts: HashMap<String, Vec<u8>>,
    /// When it was made (triggered, or added by the test).
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When a cancel was asked; it takes effect `cancel_delay` later, at `cancelled_at`.
    cancel_asked: Option<Instant>,
    pub cancelled_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl FakeRun {
    pub fn new(id: u64, job: u64, status: i64) -> FakeRun {
        FakeRun {
            id,
            job_definition_id: job,
            environment_id: None,
            status,
            git_sha: None,
            git_branch: None,
            trigger: Value::Null,
            steps: Vec::new(),
            artifacts: HashMap::new(),
            created_at: chrono::Utc::now(),
            cancel_asked: None,
            cancelled_at: None,
        }
    }

    /// Made `secs` seconds ago.
    pub fn created_secs_ago(mut self, secs: i64) -> FakeRun {
        self.created_at = chrono::Utc::now() - chrono::Duration::seconds(secs);
        self
    }

    /// The `cause` it was triggered with.
    pub fn cause(&self) -> Option<&str> {
        self.trigger.get("cause").and_then(Value::as_str)
    }

    /// Whether a cancel was asked of it.
    pub fn cancel_asked(&self) -> bool {
        self.cancel_asked.is_some()
    }

    pub fn in_environment(mut self, environment: u64) -> FakeRun {
        self.environment_id = Some(environment);
        self
    }

    /// Triggered with `trigger` (the body of `POST jobs/{id}/run/`), as dbt Cloud's own CI
    /// runs are.
    pub fn with_trigger(mut self, trigger: Value) -> FakeRun {
        self.trigger = trigger;
        self
    }

    pub fn with_sha(mut self, sha: &str) -> FakeRun {
        self.git_sha = Some(sha.to_owned());
        self
    }

    pub fn with_artifact(mut self, path: &str, bytes: Vec<u8>) -> FakeRun {
        self.artifacts.insert(path.to_owned(), bytes);
        self
    }
}

struct Fake {
    account_id: u64,
    token: String,
    run_slots: Option<u64>,
    runs: Vec<FakeRun>,
    next_id: u64,
    requests: Vec<Recorded>,
    /// The next answers, whatever is asked: these statuses (429 carries `Retry-After: 1`).
    failures: VecDeque<u16>,
    /// How the next triggers are answered: whether the run is made, and the status answered.
    trigger_answers: VecDeque<(bool, u16)>,
    cancel_delay: Duration,
}

impl Fake {
    /// Applies cancels whose delay has passed.
    fn settle(&mut self) {
        let delay = self.cancel_delay;
        for run in &mut self.runs {
            if let Some(asked) = run.cancel_asked
                && asked.elapsed() >= delay
                && !matches!(run.status, SUCCESS | ERROR | CANCELLED)
            {
                run.status = CANCELLED;
            }
        }
    }
}

type Shared = Arc<Mutex<Fake>>;

pub struct FakeDbtCloud {
    /// The access URL, as `[repository.dbt_cloud] api_url` takes it.
    pub url: String,
    pub account_id: u64,
    pub token: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDbtCloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeDbtCloud {
    pub async fn start(account_id: u64, token: &str) -> FakeDbtCloud {
        let state: Shared = Arc::new(Mutex::new(Fake {
            account_id,
            token: token.to_owned(),
            run_slots: Some(4),
            runs: Vec::new(),
            next_id: 70_000,
            requests: Vec::new(),
            failures: VecDeque::new(),
            trigger_answers: VecDeque::new(),
            cancel_delay: Duration::from_secs(2),
        }));
        let app = Router::new()
            .route("/api/v2/accounts/{account}/", get(account))
            .route("/api/v2/accounts/{account}/runs/", get(list_runs))
            .route("/api/v2/accounts/{account}/runs/{run}/", get(get_run))
            .route(
                "/api/v2/accounts/{account}/runs/{run}/cancel/",
                post(cancel_run),
            )
            .route(
                "/api/v2/accounts/{account}/runs/{run}/artifacts/{*path}",
                get(artifact),
            )
            .route("/api/v2/accounts/{account}/jobs/{job}/run/", post(trigger))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake dbt Cloud");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeDbtCloud {
            url,
            account_id,
            token: token.to_owned(),
            state,
            task,
        }
    }

    pub fn add_run(&self, run: FakeRun) {
        let mut fake = self.state.lock().unwrap();
        fake.next_id = fake.next_id.max(run.id + 1);
        fake.runs.push(run);
    }

    /// The next `statuses.len()` requests answer these statuses.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state.lock().unwrap().failures.extend(statuses);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn run(&self, id: u64) -> Option<FakeRun> {
        let mut fake = self.state.lock().unwrap();
        fake.settle();
        fake.runs.iter().find(|run| run.id == id).cloned()
    }

    pub fn set_run_slots(&self, slots: Option<u64>) {
        self.state.lock().unwrap().run_slots = slots;
    }

    /// How long a cancel takes to take effect.
    pub fn set_cancel_delay(&self, delay: Duration) {
        self.state.lock().unwrap().cancel_delay = delay;
    }

    /// How the next `answers.len()` triggers go: `(true, 502)` makes the run and answers 502
    /// (dbt Cloud acted, its answer was lost); `(false, 429)` makes nothing.
    pub fn answer_next_triggers(&self, answers: &[(bool, u16)]) {
        self.state.lock().unwrap().trigger_answers.extend(answers);
    }

    /// The runs made by `POST jobs/{id}/run/`, oldest first.
    pub fn triggered(&self) -> Vec<FakeRun> {
        let mut fake = self.state.lock().unwrap();
        fake.settle();
        fake.runs
            .iter()
            .filter(|run| !run.trigger.is_null())
            .cloned()
            .collect()
    }

    /// Changes run `id` as dbt Cloud would while it builds (status, steps, artifacts).
    pub fn update(&self, id: u64, change: impl FnOnce(&mut FakeRun)) {
        let mut fake = self.state.lock().unwrap();
        let run = fake
            .runs
            .iter_mut()
            .find(|run| run.id == id)
            .expect("a run the fake holds");
        change(run);
    }
}

/// The envelope of every answer.
fn envelope(code: StatusCode, data: Value, extra: Option<Value>) -> Response {
    let mut body = json!({
        "status": {
            "code": code.as_u16(),
            "is_success": code.is_success(),
            "user_message": if code.is_success() { "Success!".to_owned() } else { code.canonical_reason().unwrap_or("error").to_owned() },
            "developer_message": "",
        },
        "data": data,
    });
    if let Some(extra) = extra {
        body["extra"] = extra;
    }
    (code, axum::Json(body)).into_response()
}

fn not_found(what: &str) -> Response {
    let mut response = envelope(StatusCode::NOT_FOUND, Value::Null, None);
    if let Ok(value) = format!("{what} not found").parse() {
        response.headers_mut().insert("x-fake-detail", value);
    }
    response
}

/// Records the request; the answer instead of the route's, if one is due: an injected failure,
/// a 401 for a wrong token, a 404 for another account.
fn admit(
    state: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    account: u64,
    body: Value,
) -> Option<Response> {
    let mut fake = state.lock().unwrap();
    let query = uri
        .query()
        .map(|query| {
            url_pairs(query)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default();
    let authorization = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    fake.requests.push(Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query,
        body,
        authorization: authorization.clone(),
    });
    if let Some(status) = fake.failures.pop_front() {
        let status = StatusCode::from_u16(status).expect("a status");
        let mut response = envelope(status, Value::Null, None);
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", "1".parse().expect("a header"));
        }
        return Some(response);
    }
    if authorization.as_deref() != Some(&format!("Token {}", fake.token)) {
        return Some(envelope(StatusCode::UNAUTHORIZED, Value::Null, None));
    }
    if account != fake.account_id {
        return Some(not_found("account"));
    }
    fake.settle();
    None
}

/// `a=1&b=%5B1%2C2%5D` as decoded pairs.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What `include_related` asked for.
#[derive(Default, Clone, Copy)]
struct Related {
    steps: bool,
    trigger: bool,
}

impl Related {
    fn of(uri: &Uri) -> Related {
        let asked = uri
            .query()
            .map(url_pairs)
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| key == "include_related")
            .map(|(_, value)| value)
            .collect::<Vec<_>>()
            .join(",");
        Related {
            steps: asked.contains("run_steps"),
            trigger: asked.contains("trigger"),
        }
    }
}

/// A run as the API shows it, with the related objects asked for.
fn run_json(run: &FakeRun, account: u64, related: Related) -> Value {
    let finished = matches!(run.status, SUCCESS | ERROR | CANCELLED);
    let humanized = match run.status {
        QUEUED => "Queued",
        STARTING => "Starting",
        RUNNING => "Running",
        SUCCESS => "Success",
        ERROR => "Error",
        CANCELLED => "Cancelled",
        _ => "Unknown",
    };
    let mut value = json!({
        "id": run.id,
        "account_id": account,
        "job_definition_id": run.job_definition_id,
        "job_id": run.job_definition_id,
        "environment_id": run.environment_id,
        "status": run.status,
        "status_humanized": humanized,
        "git_sha": run.git_sha,
        "git_branch": run.git_branch,
        "in_progress": !finished,
        "is_complete": finished,
        "is_success": run.status == SUCCESS,
        "is_error": run.status == ERROR,
        "is_cancelled": run.status == CANCELLED,
        "created_at": run.created_at.format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string(),
        "finished_at": if finished { Value::from("2026-11-30 10:05:00.000000+00:00") } else { Value::Null },
        "href": format!("https://cloud.getdbt.com/deploy/{account}/projects/1/runs/{}/", run.id),
    });
    // The run's trigger is a related object: there only when asked for.
    if related.trigger {
        value["trigger"] = json!({
            "cause": run.trigger.get("cause").cloned().unwrap_or(Value::Null),
            "git_sha": run.trigger.get("git_sha").cloned().unwrap_or(Value::Null),
            "schema_override": run.trigger.get("schema_override").cloned().unwrap_or(Value::Null),
            "github_pull_request_id": run.trigger.get("github_pull_request_id").cloned().unwrap_or(Value::Null),
        });
    }
    if related.steps {
        value["run_steps"] = run
            .steps
            .iter()
            .enumerate()
            .map(|(index, (name, status, logs))| {
                json!({ "run_id": run.id, "account_id": account, "index": index + 1,
                        "name": name, "status": status, "logs": logs })
            })
            .collect();
    }
    value
}

async fn account(
    State(state): State<Shared>,
    Path(account): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = admit(&state, &method, &uri, &headers, account, Value::Null) {
        return response;
    }
    let fake = state.lock().unwrap();
    envelope(
        StatusCode::OK,
        json!({ "id": fake.account_id, "name": "Fake account", "run_slots": fake.run_slots, "plan": "team" }),
        None,
    )
}

async fn list_runs(
    State(state): State<Shared>,
    Path(account): Path<u64>,
    Query(query): Query<Vec<(String, String)>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = admit(&state, &method, &uri, &headers, account, Value::Null) {
        return response;
    }
    let fake = state.lock().unwrap();
    let get = |key: &str| {
        query
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
    };
    let number = |text: &str| text.trim().parse::<i64>().ok();
    let job = get("job_definition_id").and_then(|job| number(&job));
    let environment = get("environment_id").and_then(|environment| number(&environment));
    let status = get("status").and_then(|status| number(&status));
    // `status__in=[1,2,3]` (and, leniently, `1,2,3`).
    let statuses: Option<Vec<i64>> = get("status__in").map(|list| {
        list.trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter_map(number)
            .collect()
    });
    let limit = get("limit").and_then(|limit| number(&limit)).unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return envelope(StatusCode::BAD_REQUEST, Value::Null, None);
    }
    let offset = get("offset")
        .and_then(|offset| number(&offset))
        .unwrap_or(0)
        .max(0) as usize;
    let mut matching: Vec<&FakeRun> = fake
        .runs
        .iter()
        .filter(|run| job.is_none_or(|job| run.job_definition_id as i64 == job))
        .filter(|run| {
            environment.is_none_or(|environment| run.environment_id == Some(environment as u64))
        })
        .filter(|run| status.is_none_or(|status| run.status == status))
        .filter(|run| {
            statuses
                .as_ref()
                .is_none_or(|statuses| statuses.contains(&run.status))
        })
        .collect();
    match get("order_by").as_deref() {
        Some("-id") => matching.sort_by_key(|run| std::cmp::Reverse(run.id)),
        _ => matching.sort_by_key(|run| run.id),
    }
    let total = matching.len();
    let page: Vec<Value> = matching
        .into_iter()
        .skip(offset)
        .take(limit as usize)
        .map(|run| run_json(run, fake.account_id, Related::of(&uri)))
        .collect();
    let count = page.len();
    envelope(
        StatusCode::OK,
        Value::Array(page),
        Some(json!({
            "filters": { "limit": limit, "offset": offset },
            "order_by": get("order_by").unwrap_or_else(|| "id".to_owned()),
            "pagination": { "count": count, "total_count": total },
        })),
    )
}

async fn get_run(
    State(state): State<Shared>,
    Path((account, id)): Path<(u64, u64)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = admit(&state, &method, &uri, &headers, account, Value::Null) {
        return response;
    }
    let fake = state.lock().unwrap();
    match fake.runs.iter().find(|run| run.id == id) {
        Some(run) => envelope(
            StatusCode::OK,
            run_json(run, fake.account_id, Related::of(&uri)),
            None,
        ),
        None => not_found("run"),
    }
}

async fn cancel_run(
    State(state): State<Shared>,
    Path((account, id)): Path<(u64, u64)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = admit(&state, &method, &uri, &headers, account, Value::Null) {
        return response;
    }
    let mut fake = state.lock().unwrap();
    let account_id = fake.account_id;
    let cancel_delay = fake.cancel_delay;
    match fake.runs.iter_mut().find(|run| run.id == id) {
        Some(run) => {
            if run.cancel_asked.is_none() {
                run.cancel_asked = Some(Instant::now());
                run.cancelled_at = Some(
                    chrono::Utc::now()
                        + chrono::Duration::from_std(cancel_delay).expect("a short delay"),
                );
            }
            envelope(
                StatusCode::OK,
                run_json(run, account_id, Related::default()),
                None,
            )
        }
        None => not_found("run"),
    }
}

async fn artifact(
    State(state): State<Shared>,
    Path((account, id, path)): Path<(u64, u64, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = admit(&state, &method, &uri, &headers, account, Value::Null) {
        return response;
    }
    let fake = state.lock().unwrap();
    match fake
        .runs
        .iter()
        .find(|run| run.id == id)
        .and_then(|run| run.artifacts.get(&path))
    {
        Some(bytes) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            bytes.clone(),
        )
            .into_response(),
        None => not_found("artifact"),
    }
}

async fn trigger(
    State(state): State<Shared>,
    Path((account, job)): Path<(u64, u64)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(response) = admit(&state, &method, &uri, &headers, account, body.clone()) {
        return response;
    }
    if body
        .get("cause")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return envelope(StatusCode::BAD_REQUEST, Value::Null, None);
    }
    let mut fake = state.lock().unwrap();
    let answer = fake.trigger_answers.pop_front();
    if let Some((false, status)) = answer {
        let status = StatusCode::from_u16(status).expect("a status");
        let mut response = envelope(status, Value::Null, None);
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", "1".parse().expect("a header"));
        }
        return response;
    }
    let id = fake.next_id;
    fake.next_id += 1;
    let mut run = FakeRun::new(id, job, QUEUED);
    run.git_sha = body
        .get("git_sha")
        .and_then(Value::as_str)
        .map(str::to_owned);
    run.git_branch = body
        .get("git_branch")
        .and_then(Value::as_str)
        .map(str::to_owned);
    run.trigger = body;
    let account_id = fake.account_id;
    let body = run_json(&run, account_id, Related::default());
    fake.runs.push(run);
    if let Some((true, status)) = answer {
        let status = StatusCode::from_u16(status).expect("a status");
        return envelope(status, Value::Null, None);
    }
    envelope(StatusCode::OK, body, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded() {
        assert_eq!(
            url_pairs("status__in=%5B1%2C2%2C3%5D&limit=100&order_by=-id"),
            vec![
                ("status__in".to_owned(), "[1,2,3]".to_owned()),
                ("limit".to_owned(), "100".to_owned()),
                ("order_by".to_owned(), "-id".to_owned()),
            ]
        );
    }
}
