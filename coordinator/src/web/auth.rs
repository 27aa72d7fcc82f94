//! Who may see the pages, and proof that a form came from them.
//!
//! With an API token configured, the pages need a session: the login form takes the token and
//! sets `slimci_session`, an HttpOnly, SameSite=Strict cookie (Secure when the public URL is
//! https) holding an expiry and an HMAC of it under the API token. Nothing is kept on the
//! server, a restart keeps sessions, and changing the token ends them all. The cookie never
//! holds the token itself.
//!
//! Every form that changes something carries a CSRF token: the HMAC of the session (or of
//! nothing, without an API token) under the API token, or under a key made at start-up when
//! there is none. A request whose token is missing or wrong is refused before it acts.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::app::AppState;

pub const SESSION_COOKIE: &str = "slimci_session";
/// How long a login lasts.
pub const SESSION_SECS: u64 = 12 * 3600;

/// The key CSRF tokens are signed with when the coordinator has no API token: random, made once
/// per process (a restart makes open pages' forms stale, which reloading fixes).
fn process_key() -> &'static [u8] {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut key = uuid::Uuid::new_v4().as_bytes().to_vec();
        key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        key
    })
}

fn sign(key: &[u8], purpose: &str, text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(purpose.as_bytes());
    mac.update(b"\0");
    mac.update(text.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Whether pages need a login (the coordinator has an API token).
pub fn login_required(state: &AppState) -> bool {
    state.secrets.api_token.is_some()
}

/// Whether `token` is the API token.
pub fn is_api_token(state: &AppState, token: &str) -> bool {
    state
        .secrets
        .api_token
        .as_deref()
        .is_some_and(|api_token| constant_time_eq(token.as_bytes(), api_token.as_bytes()))
}

/// A new session's cookie value, `<expiry>.<hmac>`; none without an API token.
pub fn new_session(state: &AppState) -> Option<String> {
    let key = state.secrets.api_token.as_deref()?;
    let expires = now_secs() + SESSION_SECS;
    Some(format!(
        "{expires}.{}",
        sign(key.as_bytes(), "session", &expires.to_string())
    ))
}

/// The `Set-Cookie` value for `session` (`None`: clear the cookie).
pub fn session_cookie(state: &AppState, session: Option<&str>) -> String {
    let secure = if state.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    match session {
        Some(value) => format!(
            "{SESSION_COOKIE}={value}; Path=/; Max-Age={SESSION_SECS}; HttpOnly; SameSite=Strict{secure}"
        ),
        None => format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"),
    }
}

/// The request's session cookie value, if it is one this coordinator signed and it has not
/// expired.
pub fn valid_session<'h>(state: &AppState, headers: &'h HeaderMap) -> Option<&'h str> {
    let key = state.secrets.api_token.as_deref()?;
    let value = cookie(headers, SESSION_COOKIE)?;
    let (expires, mac) = value.split_once('.')?;
    let expires_at: u64 = expires.parse().ok()?;
    let expected = sign(key.as_bytes(), "session", expires);
    (constant_time_eq(mac.as_bytes(), expected.as_bytes()) && expires_at > now_secs())
        .then_some(value)
}

/// Whether the request may see the pages: no API token, or a valid session.
pub fn may_see(state: &AppState, headers: &HeaderMap) -> bool {
    !login_required(state) || valid_session(state, headers).is_some()
}

/// The CSRF token for the forms of this request's pages.
pub fn csrf_token(state: &AppState, headers: &HeaderMap) -> String {
    match state.secrets.api_token.as_deref() {
        Some(key) => sign(
            key.as_bytes(),
            "csrf",
            valid_session(state, headers).unwrap_or_default(),
        ),
        None => sign(process_key(), "csrf", ""),
    }
}

/// Whether `presented` is this request's CSRF token.
pub fn csrf_valid(state: &AppState, headers: &HeaderMap, presented: Option<&str>) -> bool {
    let Some(presented) = presented.filter(|token| !token.is_empty()) else {
        return false;
    };
    if login_required(state) && valid_session(state, headers).is_none() {
        return false;
    }
    constant_time_eq(presented.as_bytes(), csrf_token(state, headers).as_bytes())
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Where to go after logging in: a path on this coordinator, else the run list.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.contains('\\')
                && !path.chars().any(char::is_control) =>
        {
            path.to_owned()
        }
        _ => "/".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; slimci_session=x.y"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("x.y"));
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert_eq!(cookie(&headers, "c"), None);
    }

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(safe_next(Some("/runs/x?a=1")), "/runs/x?a=1");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn signatures_depend_on_key_purpose_and_text() {
        let a = sign(b"k", "session", "1");
        assert_eq!(a, sign(b"k", "session", "1"));
        assert_ne!(a, sign(b"k2", "session", "1"));
        assert_ne!(a, sign(b"k", "csrf", "1"));
        assert_ne!(a, sign(b"k", "session", "2"));
    }
}
