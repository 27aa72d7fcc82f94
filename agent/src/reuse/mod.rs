//! Reusing dbt's work across runs: its partial parse (`parse`) and its installed packages
//! (`deps`).
//!
//! **Who writes, who reads.** A pull request is code, and its code runs inside its build (a
//! Python model runs in dbt's process; so does a package's macro), where it can rewrite
//! anything the build user can write. So every entry these caches hold was written by a
//! production build (a deploy, of the production branch) and says so in its `origin.json`;
//! a PR build only ever reads them. Nothing a PR build leaves behind is read by another build.
//! Entries without an origin (written by older agents, which also saved PR builds' parses) are
//! removed when the agent starts (`remove_unproven`).
//!
//! - Parse: dbt can skip most of its parse when it finds `target/partial_parse.msgpack` from an
//!   earlier parse with the same dbt version, vars, profile, target, project files and tracked
//!   environment; it then reparses only the files whose checksums differ. Each deploy, after
//!   its build, parses production's code again the way a CI build will (the CI profile, which
//!   is the same for every PR) and publishes that parse as an artifact of the deploy. A CI
//!   build starts from the parse of the production state it compares against: a PR changes few
//!   files, so dbt reparses few. See `parse`.
//! - Packages: `dbt deps` output is kept per *deps key* (the package files and the dbt
//!   version), saved by deploys right after `dbt deps`; a PR with the same package files
//!   restores it instead of running dbt. See `deps`.

mod deps;
mod parse;

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use slimci_proto::RunId;

use crate::cache::Cache;

pub use deps::{deps_key, packages_install_path, restore_deps, save_deps};
pub use parse::{
    PARTIAL_PARSE_FILE, ParseInputs, RestoreError, parse_key, parse_mode, restore_parse,
    save_parse, saved_origin, seed_artifact_name,
};

/// The file in each parse and deps entry saying which production build wrote it.
pub const ORIGIN_FILE: &str = "origin.json";

/// Which production build wrote a cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The deploy run.
    pub deploy_run_id: RunId,
    /// Hex sha256 of the entry's file, for an entry that is one file (a parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Origin {
    fn read(entry: &Path) -> Option<Origin> {
        let bytes = std::fs::read(entry.join(ORIGIN_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write(&self, entry: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(entry.join(ORIGIN_FILE), json)
    }
}

/// The installed dbt, as precisely as can be told without starting it: the names of its
/// packages' `*.dist-info` directories (`dbt_core-1.11.16.dist-info`, `dbt_duckdb-...`), or the
/// executable's path when it is not in a virtualenv the agent can read.
pub fn dbt_identity(dbt: &Path) -> String {
    let resolved = std::fs::canonicalize(dbt).unwrap_or_else(|_| dbt.to_owned());
    let mut names: Vec<String> = resolved
        .parent()
        .and_then(Path::parent)
        .map(|venv| venv.join("lib"))
        .and_then(|lib| std::fs::read_dir(lib).ok())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python"))
        .filter_map(|python| std::fs::read_dir(python.path().join("site-packages")).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("dbt") && name.ends_with(".dist-info"))
        .collect();
    names.sort();
    if names.is_empty() {
        format!("dbt at {}", resolved.display())
    } else {
        names.join(" ")
    }
}

fn digest(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        // Length-prefixed, so no two different lists hash alike.
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// The package files of a project, in a fixed order (absent ones as empty).
fn package_files(project: &Path) -> Vec<Vec<u8>> {
    ["packages.yml", "dependencies.yml", "package-lock.yml"]
        .iter()
        .map(|name| std::fs::read(project.join(name)).unwrap_or_default())
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Removes the parse and deps entries that do not say which production build wrote them, and
/// returns their names. Older agents saved PR builds' parses; none of those may be read.
pub fn remove_unproven(cache: &Cache) -> Vec<String> {
    let mut removed = Vec::new();
    for kind in ["parse", "deps"] {
        for (name, path) in cache.entries(kind) {
            if Origin::read(&path).is_some() {
                continue;
            }
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => removed.push(format!("{kind}/{name}")),
                Err(error) => {
                    tracing::warn!(%error, entry = %path.display(), "cache: could not remove an entry of unknown origin");
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_unknown_origin_are_removed_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_owned(), u64::MAX);
        let parse = cache.kind_dir("parse").unwrap();
        std::fs::create_dir_all(parse.join("old")).unwrap();
        std::fs::write(parse.join("old").join(PARTIAL_PARSE_FILE), b"from a PR").unwrap();
        drop(cache.hold("parse", "old").unwrap());
        let deploy = RunId::new();
        save_parse(&cache, "new", b"from a deploy", deploy).unwrap();
        let deps = cache.kind_dir("deps").unwrap();
        std::fs::create_dir_all(deps.join("old/packages")).unwrap();

        assert_eq!(remove_unproven(&cache), vec!["parse/old", "deps/old"]);
        assert!(!parse.join("old").exists());
        assert!(!deps.join("old").exists());
        assert_eq!(saved_origin(&cache, "new").unwrap().deploy_run_id, deploy);
        assert!(remove_unproven(&cache).is_empty());
    }
}
