//! The web pages, served by the coordinator beside the API: `/` (recent runs), `/runs/{id}`
//! (a run: header, live log, phases, nodes, the build's timeline, artifacts, cancel),
//! `/repositories/{name}`, `/fleet`, and `/login` when the coordinator has an API token.
//!
//! Server-rendered HTML from askama templates (`coordinator/templates/`, checked at compile
//! time); every page works without JavaScript, and `static/slimci.js` only follows a running
//! run's log and progress over the API's server-sent events. The pages read the store and the
//! API's views; they change nothing except through `runs::cancel`.
//!
//! `auth`: login sessions and CSRF tokens. `runs`: the run list. `run_page`: a run's page,
//! with its head from `run_head`; `run_links`: what that page links to (the log as text, the
//! event stream, the timeline alone, artifacts). `timeline`: `run_results.json` → SVG.
//! `repository`, `fleet`: those pages.

mod auth;
pub mod fleet;
mod repository;
mod run_head;
mod run_links;
mod run_page;
mod runs;
pub mod timeline;

use std::sync::Arc;

use askama::Template;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::Deserialize;

use crate::app::AppState;
use crate::store::StoreError;

/// A page that could not be shown, as the browser gets it: an HTML page with the reason.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for WebError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "store error");
        WebError::Internal(error.to_string())
    }
}

impl From<crate::api::ApiError> for WebError {
    fn from(error: crate::api::ApiError) -> Self {
        use crate::api::ApiError;
        match error {
            ApiError::BadRequest(message) => WebError::BadRequest(message),
            ApiError::NotFound(message) => WebError::NotFound(message),
            error => WebError::Internal(error.to_string()),
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    layout: Layout,
    status: u16,
    message: String,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let status = match &self {
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::Forbidden(_) => StatusCode::FORBIDDEN,
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let page = ErrorPage {
            layout: Layout::new(status.canonical_reason().unwrap_or("error"), None),
            status: status.as_u16(),
            message: self.to_string(),
        };
        (status, render(&page)).into_response()
    }
}

pub type WebResult<T> = Result<T, WebError>;

/// What every page's frame needs: its title, and the logout form's CSRF token when someone is
/// logged in.
pub struct Layout {
    pub title: String,
    pub logout_csrf: Option<String>,
    /// The static files' version, in their URLs (`?v=`), so browsers keep them until they
    /// change.
    pub assets: &'static str,
}

impl Layout {
    fn new(title: &str, logout_csrf: Option<String>) -> Layout {
        Layout {
            title: title.to_owned(),
            logout_csrf,
            assets: assets_version(),
        }
    }

    fn for_request(state: &AppState, headers: &HeaderMap, title: &str) -> Layout {
        let logged_in = auth::valid_session(state, headers).is_some();
        Layout::new(title, logged_in.then(|| auth::csrf_token(state, headers)))
    }
}

/// A template as an HTML response; a template that fails to render is a 500 with the reason.
fn render(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "a page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the page failed to render: {error}"),
            )
                .into_response()
        }
    }
}

/// The pages' routes. `lib.rs` merges them with the API's.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(runs::index))
        .route("/runs/{id}", get(run_page::show))
        .route("/runs/{id}/cancel", post(run_page::cancel))
        .route("/runs/{id}/events", get(run_links::events))
        .route("/runs/{id}/log", get(run_links::log_text))
        .route("/runs/{id}/timeline.svg", get(run_links::timeline_svg))
        .route("/runs/{id}/artifacts/{name}", get(run_links::artifact))
        .route("/repositories/{name}", get(repository::show))
        .route("/fleet", get(fleet::show))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/static/slimci.css", get(stylesheet))
        .route("/static/slimci.js", get(script))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// Pages need a session when the coordinator has an API token: a browser is sent to the login
/// form (and back afterwards); the event stream and downloads get 401.
async fn require_session(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if auth::may_see(&state, request.headers()) {
        return next.run(request).await;
    }
    let path = request
        .uri()
        .path_and_query()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    if request.method() == axum::http::Method::GET && !path.contains("/events") {
        let target = format!("/login?next={}", percent_encode(&path));
        return Redirect::to(&target).into_response();
    }
    (StatusCode::UNAUTHORIZED, "log in first: /login").into_response()
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

const STYLESHEET: &str = include_str!("../../static/slimci.css");
const SCRIPT: &str = include_str!("../../static/slimci.js");
/// Pages name the static files with their version, so a browser may keep them for good.
const STATIC_CACHE: &str = "public, max-age=31536000, immutable";

/// The first 12 hex digits of the static files' sha256: what changes their URLs when they
/// change.
fn assets_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(STYLESHEET)
            .chain_update(SCRIPT)
            .finalize();
        hex::encode(digest)[..12].to_owned()
    })
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, STATIC_CACHE),
        ],
        STYLESHEET,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, STATIC_CACHE),
        ],
        SCRIPT,
    )
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    layout: Layout,
    next: String,
    refused: bool,
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn login_form(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<NextQuery>,
) -> Response {
    let next = auth::safe_next(query.next.as_deref());
    if auth::may_see(&state, &headers) {
        return Redirect::to(&next).into_response();
    }
    render(&LoginPage {
        layout: Layout::new("Log in", None),
        next,
        refused: false,
    })
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(State(state): State<Arc<AppState>>, Form(form): Form<LoginForm>) -> Response {
    let next = auth::safe_next(form.next.as_deref());
    if !auth::login_required(&state) {
        return Redirect::to(&next).into_response();
    }
    if !auth::is_api_token(&state, form.token.trim()) {
        tracing::warn!("web login refused: wrong token");
        let page = LoginPage {
            layout: Layout::new("Log in", None),
            next,
            refused: true,
        };
        return (StatusCode::UNAUTHORIZED, render(&page)).into_response();
    }
    let session = auth::new_session(&state);
    (
        [(
            header::SET_COOKIE,
            auth::session_cookie(&state, session.as_deref()),
        )],
        Redirect::to(&next),
    )
        .into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> WebResult<Response> {
    if !auth::csrf_valid(&state, &headers, form.csrf.as_deref()) {
        return Err(WebError::Forbidden(
            "this form is out of date or did not come from this site; reload the page".to_owned(),
        ));
    }
    Ok((
        [(header::SET_COOKIE, auth::session_cookie(&state, None))],
        Redirect::to("/login"),
    )
        .into_response())
}

/// `text` for a URL's query or path segment.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ---- formatting shared by the pages ----

/// A stored time for people: `2024-05-01 10:00:03 UTC`.
pub fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// A duration for people: `0.42 s`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
pub fn duration(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{seconds:.2} s")
    } else if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if seconds < 3600.0 {
        format!(
            "{} min {:02} s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!(
            "{} h {:02} min",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    }
}

/// The first 12 characters of a commit id.
pub fn short_sha(sha: &str) -> String {
    sha.chars().take(12).collect()
}

/// The GitHub web address of repository `full_name` (`owner/name`), from the configured API
/// URL: github.com for `api.github.com`, the host itself for GitHub Enterprise Server.
pub fn github_web(state: &AppState, full_name: &str) -> Option<String> {
    let api = state
        .config
        .github
        .as_ref()
        .map(|github| github.api_url.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| "https://api.github.com".to_owned());
    let web = if api == "https://api.github.com" {
        "https://github.com".to_owned()
    } else {
        api.strip_suffix("/api/v3").unwrap_or(&api).to_owned()
    };
    Some(format!("{web}/{full_name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(0.123), "0.12 s");
        assert_eq!(duration(12.34), "12.3 s");
        assert_eq!(duration(245.0), "4 min 05 s");
        assert_eq!(duration(7380.0), "2 h 03 min");
    }

    #[test]
    fn paths_are_encoded_for_a_query() {
        assert_eq!(percent_encode("/runs/a?b=c d"), "/runs/a%3Fb%3Dc%20d");
    }
}
