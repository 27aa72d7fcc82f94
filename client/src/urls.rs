//! Where a run and its artifacts live: the one place these URLs are spelled, for the
//! coordinator's views, its GitHub links, `slimci show` and the client's requests.

use slimci_proto::RunId;

/// `{base}/runs/{id}`: the run's web page, where people are sent (GitHub's status and comment,
/// `slimci show`, the API's `url`). `base` is the coordinator's public URL without a trailing
/// `/`.
pub fn run_url(base: &str, id: RunId) -> String {
    format!("{base}/runs/{id}")
}

/// `{base}/api/v1/runs/{id}`: the run in the JSON API.
pub fn run_api_url(base: &str, id: RunId) -> String {
    format!("{base}/api/v1/runs/{id}")
}

/// `{base}/api/v1/runs/{id}/logs`: the log as plain text.
pub fn run_logs_url(base: &str, id: RunId) -> String {
    format!("{}/logs", run_api_url(base, id))
}

/// `{base}/api/v1/runs/{id}/artifacts/{name}`.
pub fn artifact_url(base: &str, id: RunId, name: &str) -> String {
    format!("{}/artifacts/{name}", run_api_url(base, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_get_the_page_and_programs_the_api() {
        let id = RunId::new();
        assert_eq!(run_url("http://c", id), format!("http://c/runs/{id}"));
        assert_eq!(
            run_api_url("http://c", id),
            format!("http://c/api/v1/runs/{id}")
        );
        assert_eq!(
            run_logs_url("http://c", id),
            format!("http://c/api/v1/runs/{id}/logs")
        );
        assert_eq!(
            artifact_url("http://c", id, "manifest.json"),
            format!("http://c/api/v1/runs/{id}/artifacts/manifest.json")
        );
    }
}
