//! Where the harness finds what it runs: the workspace's binaries (refused when older than
//! their sources), dbt's virtualenv, and copies of executables the build user must reach.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Where cargo put the workspace binary `name` (test executables live in `target/<profile>/deps`,
/// binaries beside the others in `target/<profile>`). Panics, saying what to run, when it is
/// missing or older than any source file it was built from.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let beside = exe.parent().expect("executable directory");
    let candidates = [
        beside.join(name),
        beside
            .parent()
            .map(|dir| dir.join(name))
            .unwrap_or_default(),
    ];
    let Some(path) = candidates.iter().find(|path| path.is_file()).cloned() else {
        panic!(
            "{name} is missing beside {}: run `cargo build --workspace --bins` first (scripts/e2e and scripts/test do)",
            exe.display()
        );
    };
    if let Some(source) = newer_source(&path) {
        panic!(
            "{} is older than its source {}: it would test stale code. Run `cargo build --workspace --bins` first (scripts/e2e and scripts/test do)",
            path.display(),
            source.display()
        );
    }
    path
}

/// A source file that changed after `binary` was linked, from cargo's dep-info file beside it
/// (`<binary>.d`: every file the build read). Checked once per binary and process.
fn newer_source(binary: &Path) -> Option<PathBuf> {
    static CHECKED: Mutex<Option<HashMap<PathBuf, Option<PathBuf>>>> = Mutex::new(None);
    let mut checked = CHECKED.lock().unwrap_or_else(|poison| poison.into_inner());
    checked
        .get_or_insert_with(HashMap::new)
        .entry(binary.to_owned())
        .or_insert_with(|| {
            let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
            let dep_info = std::fs::read_to_string(binary.with_extension("d")).ok()?;
            dep_info_sources(&dep_info)
                .into_iter()
                .find(|source| modified(source).is_some_and(|time| time > built))
        })
        .clone()
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The prerequisites of the first rule of a Makefile-style dep-info text (`target: a b\ c`).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let Some(line) = text.lines().find(|line| line.contains(": ")) else {
        return Vec::new();
    };
    let (_, prerequisites) = line.split_once(": ").unwrap_or_default();
    let mut sources = Vec::new();
    let mut current = String::new();
    let mut chars = prerequisites.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ' ' => {
                if !current.is_empty() {
                    sources.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        sources.push(PathBuf::from(current));
    }
    sources
}

/// The dbt executable the end-to-end tests run: `SLIMCI_DBT`, or else the virtualenv
/// `scripts/lib.sh` installs (`<cache>/dbt-<hash of scripts/requirements-dbt.txt>/bin/dbt`).
pub fn dbt() -> PathBuf {
    if let Ok(path) = std::env::var("SLIMCI_DBT") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "SLIMCI_DBT={} does not exist",
            path.display()
        );
        return path;
    }
    let installed = installed_dbt();
    assert!(
        installed.is_file(),
        "dbt is not installed at {} and SLIMCI_DBT is not set: run scripts/e2e (or scripts/test), which installs it",
        installed.display()
    );
    installed
}

fn installed_dbt() -> PathBuf {
    use sha2::Digest;
    let requirements = std::fs::read(workspace_root().join("scripts/requirements-dbt.txt"))
        .expect("scripts/requirements-dbt.txt");
    let hash = hex::encode(sha2::Sha256::digest(&requirements));
    let cache = match std::env::var("SLIMCI_CACHE") {
        Ok(cache) => PathBuf::from(cache),
        Err(_) if nix::unistd::geteuid().is_root() => PathBuf::from("/var/cache/slimci"),
        Err(_) => PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/slimci"),
    };
    cache.join(format!("dbt-{}/bin/dbt", &hash[..16]))
}

/// The Python of dbt's virtualenv, which has the duckdb module.
pub fn python() -> PathBuf {
    dbt().with_file_name("python")
}

/// A copy of the executable `program` in `dir` (made world-readable and executable), for
/// programs the build user runs: a checkout may sit in a directory only its owner can enter
/// (a clone under /root), where the build user cannot reach `target/`.
pub fn reachable_copy(program: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let copy = dir.join(program.file_name().unwrap_or_default());
    std::fs::copy(program, &copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_lists_every_prerequisite_with_escaped_spaces() {
        let text = "/t/debug/slimci-agent: /w/agent/src/lib.rs /w/my\\ dir/a.rs /w/agent/src/slimci_worker.py\n\n/w/agent/src/lib.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            [
                PathBuf::from("/w/agent/src/lib.rs"),
                PathBuf::from("/w/my dir/a.rs"),
                PathBuf::from("/w/agent/src/slimci_worker.py"),
            ]
        );
    }

    #[test]
    fn a_binary_older_than_a_source_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("main.rs");
        let binary = dir.path().join("tool");
        std::fs::write(&binary, "").unwrap();
        std::fs::write(
            binary.with_extension("d"),
            format!("{}: {}\n", binary.display(), source.display()),
        )
        .unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&binary)
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::write(&source, "fn main() {}").unwrap();
        assert_eq!(newer_source(&binary), Some(source));
    }
}
