//! Waiting for a condition with a deadline, never a bare sleep.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::process::check_watched;

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`. Fails at once
/// when a process the test started died on its own (naming it and its last log line), and
/// when one `check` itself does not answer before the deadline (a request that hangs).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        check_watched().map_err(|died| died.context(format!("while waiting for {what}")))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining.max(Duration::from_millis(100)), check()).await {
            Ok(result) => {
                if let Some(value) = result? {
                    return Ok(value);
                }
            }
            Err(_) => bail!(
                "timed out after {timeout:?} waiting for {what} (the last check did not answer)"
            ),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
