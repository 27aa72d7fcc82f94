//! What a GitHub `pull_request` webhook asks for.

/// What a `pull_request` webhook asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullRequestAction {
    /// Build the head commit (superseding older ones).
    Build,
    /// A draft, and the repository does not build drafts.
    SkipDraft,
    /// Stop what is in flight (it became a draft).
    CancelInFlight,
    /// Stop what is in flight and drop the PR's isolation.
    Close,
    Ignore,
}

pub fn pull_request_action(action: &str, draft: bool, build_drafts: bool) -> PullRequestAction {
    match action {
        "opened" | "reopened" | "synchronize" | "ready_for_review" if draft && !build_drafts => {
            PullRequestAction::SkipDraft
        }
        "opened" | "reopened" | "synchronize" | "ready_for_review" => PullRequestAction::Build,
        "converted_to_draft" if !build_drafts => PullRequestAction::CancelInFlight,
        "closed" => PullRequestAction::Close,
        _ => PullRequestAction::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_request_actions() {
        use PullRequestAction::*;
        assert_eq!(pull_request_action("opened", false, false), Build);
        assert_eq!(pull_request_action("synchronize", true, false), SkipDraft);
        assert_eq!(pull_request_action("synchronize", true, true), Build);
        assert_eq!(pull_request_action("ready_for_review", false, false), Build);
        assert_eq!(
            pull_request_action("converted_to_draft", true, false),
            CancelInFlight
        );
        assert_eq!(
            pull_request_action("converted_to_draft", true, true),
            Ignore
        );
        assert_eq!(pull_request_action("closed", false, false), Close);
        assert_eq!(pull_request_action("labeled", false, false), Ignore);
    }
}
