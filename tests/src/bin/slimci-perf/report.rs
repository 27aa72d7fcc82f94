//! How a figure is printed: a sample's spread (p50, p90, max) and the PASS or MISS beside a
//! target.

use slimci_tests::measure::{p50, percentile};

/// `PASS` or `MISS` (a missed target is a result, not a failure).
pub fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// `p50    12.0 ms  p90    20.0 ms  max    31.0 ms  (n=30)`
pub fn spread(values: &[f64]) -> String {
    format!(
        "p50 {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms  (n={})",
        p50(values),
        percentile(values, 90.0),
        percentile(values, 100.0),
        values.len()
    )
}
