//! `POST /api/v1/runs`: the request as the client sends it and the coordinator receives it,
//! before validation.

use serde::{Deserialize, Serialize};

/// A run request. Fields the client leaves out are not sent; the coordinator refuses fields it
/// does not know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub repository: String,
    /// `ci` (default) or `deploy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// For a deploy: the branch to build (default: the production branch). For CI: the ref
    /// that holds the PR's commits (default `refs/pull/<pr>/head`, GitHub's convention).
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_sent_is_what_is_received_and_unknown_fields_are_refused() {
        let sent = RunRequest {
            repository: "shop".into(),
            kind: Some("ci".into()),
            pr: Some(4),
            sha: Some("ab".repeat(20)),
            git_ref: None,
        };
        let wire = serde_json::to_string(&sent).unwrap();
        assert!(
            !wire.contains("ref"),
            "fields left out are not sent: {wire}"
        );
        assert_eq!(serde_json::from_str::<RunRequest>(&wire).unwrap(), sent);
        assert!(
            serde_json::from_str::<RunRequest>(r#"{"repository":"shop","nightly":true}"#).is_err(),
            "unknown fields are refused"
        );
    }
}
