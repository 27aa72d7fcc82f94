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
