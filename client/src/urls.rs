//! Where a run and its artifacts live: the one place the user API's URLs are spelled, for the
//! coordinator's views, its GitHub links and the client's requests.

use slimci_proto::RunId;

/// `{base}/api/v1/runs/{id}`; `base` is the coordinator's public URL without a trailing `/`.
pub fn run_url(base: &str, id: RunId) -> String {
    format!("{base}/api/v1/runs/{id}")
}

/// `{base}/api/v1/runs/{id}/logs`.
pub fn run_logs_url(base: &str, id: RunId) -> String {
    format!("{}/logs", run_url(base, id))
}

/// `{base}/api/v1/runs/{id}/artifacts/{name}`.
pub fn artifact_url(base: &str, id: RunId, name: &str) -> String {
    format!("{}/artifacts/{name}", run_url(base, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_hang_off_the_run() {
        let id = RunId::new();
        assert_eq!(
            run_url("http://c", id),
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
