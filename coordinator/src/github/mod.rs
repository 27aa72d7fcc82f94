//! Results on GitHub: a commit status per run and one comment per pull request, updated in
//! place. `client` speaks GitHub's REST API, `render` says what to tell it, `notifier` tells it
//! whenever a run changes.

mod client;
mod notifier;
mod render;

pub use client::{GitHub, GitHubError};
pub use notifier::notifier_loop;
pub use render::{COMMENT_MARKER, CommitStatus, comment_body, commit_status, result_line};
