//! A git repository of a dbt project for a test, with `main` and pull-request refs made on
//! demand, and the one-line edits of `examples/shop/README.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

use crate::binaries::workspace_root;

/// Runs git in `dir` as a test user; its trimmed standard output.
pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=slimci-test",
            "-c",
            "user.email=test@example.com",
        ])
        .args(args)
        .current_dir(dir)
        .output()?;
    if !output.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// A git repository of `examples/shop`, with `main` and pull-request refs made on demand.
pub struct Origin {
    pub path: PathBuf,
}

impl Origin {
    pub fn create(path: PathBuf) -> anyhow::Result<Origin> {
        Origin::create_from(&workspace_root().join("examples/shop"), path)
    }

    /// A git repository of the dbt project in `project`.
    pub fn create_from(project: &Path, path: PathBuf) -> anyhow::Result<Origin> {
        let status = Command::new("cp")
            .arg("-r")
            .arg(project)
            .arg(&path)
            .status()?;
        if !status.success() {
            bail!("copying {} failed", project.display());
        }
        git(&path, &["init", "-q", "-b", "main"])?;
        git(&path, &["add", "."])?;
        git(&path, &["commit", "-qm", "Shop project"])?;
        Ok(Origin { path })
    }

    pub fn main_sha(&self) -> anyhow::Result<String> {
        git(&self.path, &["rev-parse", "main"])
    }

    /// Writes `file` on main and commits it; returns the new head.
    pub fn commit_file_on_main(&self, file: &str, content: &str) -> anyhow::Result<String> {
        std::fs::write(self.path.join(file), content)?;
        git(&self.path, &["add", file])?;
        git(&self.path, &["commit", "-qm", &format!("Change {file}")])?;
        self.main_sha()
    }

    /// Points `refs/pull/<pr>/head` at an existing commit.
    pub fn point_pull_request(&self, pr: u64, sha: &str) -> anyhow::Result<()> {
        git(
            &self.path,
            &["update-ref", &format!("refs/pull/{pr}/head"), sha],
        )?;
        Ok(())
    }

    /// Commits `edits` ((file, old text, new text); an empty old text adds a new file) on top
    /// of main as pull request `pr`, points `refs/pull/<pr>/head` at it, and returns its SHA.
    /// Main is left as it was.
    pub fn pull_request(&self, pr: u64, edits: &[(&str, &str, &str)]) -> anyhow::Result<String> {
        let branch = format!("pr-{pr}-{}", uuid::Uuid::new_v4().simple());
        git(&self.path, &["checkout", "-qb", &branch, "main"])?;
        for (file, old, new) in edits {
            let path = self.path.join(file);
            if old.is_empty() {
                if path.exists() {
                    bail!("{file} exists already");
                }
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, new)?;
                git(&self.path, &["add", file])?;
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            if !text.contains(old) {
                bail!("{file} does not contain {old:?}");
            }
            std::fs::write(&path, text.replacen(old, new, 1))?;
        }
        git(&self.path, &["commit", "-qam", &format!("PR {pr}")])?;
        let sha = git(&self.path, &["rev-parse", "HEAD"])?;
        git(
            &self.path,
            &["update-ref", &format!("refs/pull/{pr}/head"), &sha],
        )?;
        git(&self.path, &["checkout", "-q", "main"])?;
        git(&self.path, &["branch", "-qD", &branch])?;
        Ok(sha)
    }
}

/// The edits of `examples/shop/README.md`, all to `models/staging/stg_orders.sql`.
pub mod edits {
    pub const FILE: &str = "models/staging/stg_orders.sql";
    /// Adds a column; every test still passes.
    pub const ADD_COLUMN: (&str, &str, &str) = (
        FILE,
        "        cast(order_date as date) as order_date,",
        "        cast(order_date as date) as order_date,\n        dayname(order_date) as order_day_of_week,",
    );
    /// Upper-cases the status, which the `accepted_values` test rejects.
    pub const FAIL_TEST: (&str, &str, &str) =
        (FILE, "lower(status) as status", "upper(status) as status");
    /// A change that keeps every test passing, for a second commit of one PR.
    pub const RESPACE: (&str, &str, &str) =
        (FILE, "lower(status) as status", "lower(status)  as status");
    /// A syntax error.
    pub const BAD_SQL: (&str, &str, &str) =
        (FILE, "lower(status) as status", "lower(status as status");
}
