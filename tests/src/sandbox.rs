//! Helpers for the sandbox tests: the hostile fixtures (`tests/fixtures/hostile`), committing a
//! case as a pull request, and looking for processes and build cgroups from outside.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use crate::origin::git;
use crate::{Origin, workspace_root};

/// The hostile dbt project (the `shop` repository of a cluster started with it).
pub fn hostile_project() -> PathBuf {
    workspace_root().join("tests/fixtures/hostile/project")
}

/// A case model's text with its `__PLACEHOLDERS__` filled in.
pub fn case(name: &str, substitutions: &[(&str, &str)]) -> String {
    let path = workspace_root()
        .join("tests/fixtures/hostile/cases")
        .join(name);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    for (placeholder, value) in substitutions {
        text = text.replace(placeholder, value);
    }
    text
}

/// Commits `content` as `models/<file>` on top of main as pull request `pr` (points
/// `refs/pull/<pr>/head` at it) and returns the commit. Main is left as it was.
pub fn add_model(origin: &Origin, pr: u64, file: &str, content: &str) -> anyhow::Result<String> {
    let branch = format!("pr-{pr}-{}", uuid::Uuid::new_v4().simple());
    git(&origin.path, &["checkout", "-qb", &branch, "main"])?;
    std::fs::write(origin.path.join("models").join(file), content)?;
    git(&origin.path, &["add", "."])?;
    git(
        &origin.path,
        &["commit", "-qm", &format!("PR {pr}: {file}")],
    )?;
    let sha = git(&origin.path, &["rev-parse", "HEAD"])?;
    git(
        &origin.path,
        &["update-ref", &format!("refs/pull/{pr}/head"), &sha],
    )?;
    git(&origin.path, &["checkout", "-q", "main"])?;
    git(&origin.path, &["branch", "-qD", &branch])?;
    Ok(sha)
}

/// A fresh marker for the command lines of a test's processes.
pub fn marker() -> String {
    format!("slimci-marker-{}", uuid::Uuid::new_v4().simple())
}

fn stat_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Whether `pid` is a live process (a zombie has ended).
pub fn is_alive(pid: i32) -> bool {
    stat_state(pid).is_some_and(|state| state != 'Z' && state != 'X')
}

/// Live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
        })
        .filter(|pid| is_alive(*pid))
        .collect()
}

/// The cgroup directories of a run's builds (`slimci-<run id>-...` under /sys/fs/cgroup).
pub fn build_cgroups(run_id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, prefix: &str, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                found.push(path);
            } else if depth < 6 {
                walk(&path, prefix, depth + 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        &format!("slimci-{run_id}"),
        0,
        &mut found,
    );
    found
}

/// The number of tasks in a run's build cgroup (`pids.current`), if it has a pids controller.
pub fn build_pids_current(run_id: &str) -> Option<u64> {
    build_cgroups(run_id).iter().find_map(|dir| {
        std::fs::read_to_string(dir.join("pids.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

/// Fails unless `pids` are all gone within `within` (the kernel may take a moment to reap).
pub async fn assert_gone(what: &str, pids: &[i32], within: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|pid| is_alive(*pid)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{what}: processes {alive:?} are still alive after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills every process carrying `marker`: tests clean up after themselves even when the
/// sandbox failed them.
pub struct MarkerGuard(pub String);

impl Drop for MarkerGuard {
    fn drop(&mut self) {
        for pid in processes_with(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
