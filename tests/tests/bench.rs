//! `bench/run` keeps working: the benchmark binary on a small generated project, one round.

use std::process::Command;

use slimci_tests::binary;

#[test]
fn the_benchmark_runs_end_to_end_and_prints_its_machine_readable_line() {
    let output = Command::new(binary("slimci-bench"))
        .args(["--models", "30", "--rounds", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let fields: Vec<(&str, &str)> = last
        .strip_prefix("bench ")
        .unwrap_or_else(|| panic!("last line: {last}"))
        .split(' ')
        .map(|field| field.split_once('=').unwrap())
        .collect();
    let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "warehouse",
            "n_models",
            "a_s",
            "b_s",
            "c_s",
            "a_over_b",
            "a_over_c"
        ],
        "{last}"
    );
    assert_eq!(fields[0].1, "duckdb");
    assert_eq!(fields[1].1, "30");
    for (name, value) in &fields[2..] {
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{name}={value}"));
        assert!(value.is_finite() && value > 0.0, "{last}");
    }
    // slimci's run reused the warm-up's parse, on a pre-started dbt.
    assert!(stdout.contains("parse modes: partial"), "{stdout}");
    assert!(stdout.contains("genproject models=30 "), "{stdout}");
}
