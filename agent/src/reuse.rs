//! Reusing dbt's work across runs: its partial parse and its installed packages.
//!
//! Parse dominates a small PR build on a large project (a 1,400-model project parses in about
//! 10 s; the build of a one-line change takes about 1 s). dbt can skip most of it when it finds
//! `target/partial_parse.msgpack` from an earlier parse with the same dbt version, vars,
//! profile, target, project files and tracked environment; it then reparses only the files
//! whose checksums differ. The agent keeps the latest such file per *parse key* (the digest of
//! everything dbt checks first) and puts it into each run's target directory. The DuckDB profile
//! the agent writes is identical for every PR of a repository (relative paths through links in
//! the run directory), so one PR's parse seeds the next. dbt still checks every input itself:
//! a cached file can make a parse faster, never wrong.
//!
//! Packages: `dbt deps` output (`dbt_packages/`) is kept per *deps key*, the digest of the
//! package files (packages.yml, dependencies.yml, package-lock.yml) and the dbt version; a hit
//! restores the tree instead of running dbt. Links dbt made for `local:` packages are stored
//! relative to the project, so they point into each run's own checkout.

use std::io::BufRead;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cache::{Cache, Held, copy_tree, publish, staging_path};

pub const PARTIAL_PARSE_FILE: &str = "partial_parse.msgpack";

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

/// What dbt checks before it reuses a saved parse, and what decides which saved parse fits.
pub struct ParseInputs<'a> {
    pub dbt_identity: &'a str,
    pub repository: &'a str,
    pub project_dir: &'a str,
    pub target: &'a str,
    pub profile: &'a str,
    /// The environment dbt gets (names and values), including secrets: a changed secret is a
    /// changed profile.
    pub env: &'a [(String, String)],
    pub project: &'a Path,
}

pub fn parse_key(inputs: &ParseInputs<'_>) -> String {
    let project_file = std::fs::read(inputs.project.join("dbt_project.yml")).unwrap_or_default();
    let mut env: Vec<String> = inputs
        .env
        .iter()
        // Paths of the run itself differ every time and are not dbt's parse inputs.
        .filter(|(name, _)| {
            !matches!(name.as_str(), "HOME" | "TMPDIR")
                && !name.ends_with("_PATH")
                && !name.ends_with("_DIR")
        })
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    env.sort();
    let env = env.join("\0");
    let packages = package_files(inputs.project);
    let mut parts: Vec<&[u8]> = vec![
        b"parse v1",
        inputs.dbt_identity.as_bytes(),
        inputs.repository.as_bytes(),
        inputs.project_dir.as_bytes(),
        inputs.target.as_bytes(),
        inputs.profile.as_bytes(),
        env.as_bytes(),
        &project_file,
    ];
    parts.extend(packages.iter().map(Vec::as_slice));
    digest(&parts)
}

/// A saved parse put into a run's target directory.
pub struct RestoredParse {
    /// Whether there was one to restore.
    pub restored: bool,
    /// The file's length and mtime as restored, to tell later whether dbt wrote a new one.
    stamp: Option<(u64, std::time::SystemTime)>,
    pub held: Held,
}

fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.len(), metadata.modified().ok()?))
}

/// Copies the saved parse for `key`, if any, to `target_dir/partial_parse.msgpack`.
pub fn restore_parse(
    cache: &Cache,
    key: &str,
    target_dir: &Path,
) -> std::io::Result<RestoredParse> {
    let held = cache.hold("parse", key)?;
    let saved = cache.kind_dir("parse")?.join(key).join(PARTIAL_PARSE_FILE);
    let destination = target_dir.join(PARTIAL_PARSE_FILE);
    let restored = match std::fs::copy(&saved, &destination) {
        Ok(_) => true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => return Err(error),
    };
    Ok(RestoredParse {
        restored,
        stamp: restored.then(|| stamp(&destination)).flatten(),
        held,
    })
}

/// Saves the parse dbt wrote in `target_dir` under `key`, replacing the older one, if dbt wrote
/// a new one (a build that failed before parsing writes none). Returns whether it saved.
pub fn save_parse(
    cache: &Cache,
    key: &str,
    target_dir: &Path,
    restored: &RestoredParse,
) -> std::io::Result<bool> {
    let written = target_dir.join(PARTIAL_PARSE_FILE);
    let Some(now) = stamp(&written) else {
        return Ok(false);
    };
    if restored.stamp == Some(now) {
        return Ok(false);
    }
    let entry = cache.kind_dir("parse")?.join(key);
    std::fs::create_dir_all(&entry)?;
    let staged = staging_path(&entry.join(PARTIAL_PARSE_FILE));
    std::fs::copy(&written, &staged)?;
    // A file renames over the old one atomically: readers get the old or the new, whole.
    std::fs::rename(&staged, entry.join(PARTIAL_PARSE_FILE))?;
    Ok(true)
}

/// How dbt parsed, from its debug log file (`logs/dbt.log`): `("partial", None)`,
/// `("full", Some(reason))`, or `("unknown", None)` if the log does not say.
pub fn parse_mode(dbt_log: &Path) -> (&'static str, Option<String>) {
    let Ok(file) = std::fs::File::open(dbt_log) else {
        return ("unknown", None);
    };
    // The parse is among the first things dbt logs; never read a huge log to its end.
    for line in std::io::BufReader::new(file)
        .split(b'\n')
        .take(200_000)
        .map_while(Result::ok)
    {
        let line = String::from_utf8_lossy(&line);
        if ![
            "Partial parsing",
            "partial parsing",
            "Failed to load parsed file",
        ]
        .iter()
        .any(|needle| line.contains(needle))
        {
            continue;
        }
        // With `--log-format json` the file is JSON lines too; the text is `info.msg`.
        let message = line
            .starts_with('{')
            .then(|| serde_json::from_str::<serde_json::Value>(&line).ok())
            .flatten()
            .and_then(|event| event["info"]["msg"].as_str().map(str::to_owned))
            .unwrap_or_else(|| line.into_owned());
        if message.contains("Partial parsing enabled") {
            return ("partial", None);
        }
        if let Some((_, reason)) = message.split_once("Unable to do partial parsing because ") {
            let reason = reason
                .trim()
                .trim_end_matches('.')
                .trim_end_matches(". Starting full parse");
            return ("full", Some(reason.to_owned()));
        }
        if message.contains("Failed to load parsed file from disk") {
            return ("full", Some("the saved parse could not be read".to_owned()));
        }
        if message.contains("Partial parsing not enabled") {
            return ("full", Some("partial parsing is off".to_owned()));
        }
    }
    ("unknown", None)
}

/// Where the project installs packages (`packages-install-path`, default `dbt_packages`), if
/// it is a plain path inside the project.
pub fn packages_install_path(project: &Path) -> Option<PathBuf> {
    let configured = std::fs::read_to_string(project.join("dbt_project.yml"))
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|value| {
            value
                .get("packages-install-path")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "dbt_packages".to_owned());
    let path = PathBuf::from(&configured);
    path.components()
        .all(|part| matches!(part, Component::Normal(_)))
        .then_some(path)
}

pub fn deps_key(dbt_identity: &str, project: &Path) -> String {
    let packages = package_files(project);
    let mut parts: Vec<&[u8]> = vec![b"deps v1", dbt_identity.as_bytes()];
    parts.extend(packages.iter().map(Vec::as_slice));
    digest(&parts)
}

/// Restores the packages saved for `key` into the project; false if there are none.
pub fn restore_deps(
    cache: &Cache,
    key: &str,
    project: &Path,
    install: &Path,
) -> std::io::Result<bool> {
    let _held = cache.hold("deps", key)?;
    let entry = cache.kind_dir("deps")?.join(key);
    if !entry.join("packages").is_dir() {
        return Ok(false);
    }
    let destination = project.join(install);
    if destination.exists() {
        std::fs::remove_dir_all(&destination)?;
    }
    if let Some(parent) = destination.parent() {
        std::fs::create_dir_all(parent)?;
    }
    copy_tree(&entry.join("packages"), &destination)?;
    let lock = entry.join("package-lock.yml");
    if lock.is_file() && !project.join("package-lock.yml").exists() {
        std::fs::copy(&lock, project.join("package-lock.yml"))?;
    }
    Ok(true)
}

/// Saves what `dbt deps` installed. Links to `local:` packages inside the project are stored
/// relative to their place; a link out of the project makes the packages uncacheable
/// (`Ok(Some(reason))`).
pub fn save_deps(
    cache: &Cache,
    key: &str,
    project: &Path,
    install: &Path,
) -> std::io::Result<Option<String>> {
    let installed = project.join(install);
    if !installed.is_dir() {
        return Ok(Some(format!(
            "dbt deps installed nothing in {}",
            install.display()
        )));
    }
    let _held = cache.hold("deps", key)?;
    let entry = cache.kind_dir("deps")?.join(key);
    if entry.is_dir() {
        return Ok(None);
    }
    let staged = staging_path(&entry);
    std::fs::create_dir_all(&staged)?;
    let result = (|| {
        copy_tree(&installed, &staged.join("packages"))?;
        if let Some(reason) = relativize_links(&staged.join("packages"), &installed, project)? {
            return Ok(Some(reason));
        }
        let lock = project.join("package-lock.yml");
        if lock.is_file() {
            std::fs::copy(&lock, staged.join("package-lock.yml"))?;
        }
        publish(&staged, &entry, false)?;
        Ok(None)
    })();
    if staged.exists() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

/// Rewrites each absolute link under `copy` (a copy of `original`) that points into `project` as
/// a relative one. Returns a reason if a link points elsewhere.
fn relativize_links(
    copy: &Path,
    original: &Path,
    project: &Path,
) -> std::io::Result<Option<String>> {
    for item in std::fs::read_dir(copy)? {
        let item = item?;
        let path = item.path();
        let file_type = item.file_type()?;
        if file_type.is_dir() {
            let relative = path.strip_prefix(copy).unwrap_or(&path).to_owned();
            if let Some(reason) = relativize_links(&path, &original.join(relative), project)? {
                return Ok(Some(reason));
            }
            continue;
        }
        if !file_type.is_symlink() {
            continue;
        }
        let target = std::fs::read_link(&path)?;
        if target.is_relative() {
            continue;
        }
        let Ok(inside) = target.strip_prefix(project) else {
            return Ok(Some(format!(
                "{} links outside the project ({})",
                item.file_name().to_string_lossy(),
                target.display()
            )));
        };
        // From the link's directory back up to the project, then down to the target.
        let link_dir = original
            .join(path.strip_prefix(copy).unwrap_or(&path))
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let depth = link_dir
            .strip_prefix(project)
            .map(|below| below.components().count())
            .unwrap_or(0);
        let mut relative = PathBuf::new();
        for _ in 0..depth {
            relative.push("..");
        }
        relative.push(inside);
        std::fs::remove_file(&path)?;
        std::os::unix::fs::symlink(&relative, &path)?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keys_ignore_run_paths_but_not_profiles_or_project_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dbt_project.yml"), "name: shop\n").unwrap();
        let env = |home: &str| {
            vec![
                ("HOME".to_owned(), home.to_owned()),
                ("DBT_TARGET_PATH".to_owned(), format!("{home}/target")),
                ("DBT_PROFILES_DIR".to_owned(), format!("{home}/profiles")),
                ("DBT_ENV_SECRET_X".to_owned(), "s3cret".to_owned()),
            ]
        };
        let (env_a, env_b) = (env("/runs/a"), env("/runs/b"));
        let inputs = |env, profile| ParseInputs {
            dbt_identity: "dbt_core-1.11.16.dist-info",
            repository: "shop",
            project_dir: "",
            target: "ci",
            profile,
            env,
            project: dir.path(),
        };
        let a = parse_key(&inputs(&env_a, "p: 1"));
        assert_eq!(a, parse_key(&inputs(&env_b, "p: 1")));
        assert_ne!(a, parse_key(&inputs(&env_a, "p: 2")));
        std::fs::write(
            dir.path().join("dbt_project.yml"),
            "name: shop\nvars: {a: 1}\n",
        )
        .unwrap();
        assert_ne!(a, parse_key(&inputs(&env_a, "p: 1")));
    }

    #[test]
    fn a_parse_is_saved_only_when_dbt_wrote_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let restored = restore_parse(&cache, "k", &target).unwrap();
        assert!(!restored.restored);
        assert!(!save_parse(&cache, "k", &target, &restored).unwrap());
        std::fs::write(target.join(PARTIAL_PARSE_FILE), b"first").unwrap();
        assert!(save_parse(&cache, "k", &target, &restored).unwrap());

        let second = dir.path().join("target2");
        std::fs::create_dir(&second).unwrap();
        let restored = restore_parse(&cache, "k", &second).unwrap();
        assert!(restored.restored);
        assert_eq!(
            std::fs::read(second.join(PARTIAL_PARSE_FILE)).unwrap(),
            b"first"
        );
        // dbt failed before parsing: the file is as restored, nothing to save.
        assert!(!save_parse(&cache, "k", &second, &restored).unwrap());
    }

    #[test]
    fn the_parse_mode_comes_from_dbts_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dbt.log");
        std::fs::write(&log, "12:00:00.1 [debug] [MainThread]: Partial parsing enabled: 0 files deleted, 0 files added, 1 files changed.\n").unwrap();
        assert_eq!(parse_mode(&log), ("partial", None));
        std::fs::write(&log, "12:00:00.1 [info ] [MainThread]: Unable to do partial parsing because saved manifest not found. Starting full parse.\n").unwrap();
        assert_eq!(
            parse_mode(&log),
            ("full", Some("saved manifest not found".to_owned()))
        );
        std::fs::write(&log, "12:00:00.1 [info ] [MainThread]: Unable to do partial parsing because profile has changed\n").unwrap();
        assert_eq!(
            parse_mode(&log),
            ("full", Some("profile has changed".to_owned()))
        );
        assert_eq!(parse_mode(&dir.path().join("none.log")), ("unknown", None));
        std::fs::write(&log, concat!(
            r#"{"data": {}, "info": {"code": "A001", "msg": "Running with dbt=1.11.16", "name": "MainReportVersion"}}"#, "\n",
            r#"{"data": {"reason": "saved manifest not found. Starting full parse."}, "info": {"code": "I024", "msg": "Unable to do partial parsing because saved manifest not found. Starting full parse.", "name": "UnableToPartialParse"}}"#, "\n",
        )).unwrap();
        assert_eq!(
            parse_mode(&log),
            ("full", Some("saved manifest not found".to_owned()))
        );
    }

    #[test]
    fn packages_round_trip_with_local_links_made_relative() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let first = dir.path().join("run1/src");
        std::fs::create_dir_all(first.join("vendor/utils/macros")).unwrap();
        std::fs::create_dir_all(first.join("dbt_packages/hub_pkg/macros")).unwrap();
        std::fs::write(first.join("dbt_packages/hub_pkg/macros/m.sql"), "m").unwrap();
        std::os::unix::fs::symlink(first.join("vendor/utils"), first.join("dbt_packages/utils"))
            .unwrap();
        std::fs::write(first.join("packages.yml"), "packages: []\n").unwrap();
        let key = deps_key("dbt", &first);
        assert_eq!(
            save_deps(&cache, &key, &first, Path::new("dbt_packages")).unwrap(),
            None
        );

        let second = dir.path().join("run2/src");
        std::fs::create_dir_all(second.join("vendor/utils/macros")).unwrap();
        std::fs::write(second.join("vendor/utils/macros/u.sql"), "u").unwrap();
        std::fs::write(second.join("packages.yml"), "packages: []\n").unwrap();
        assert_eq!(deps_key("dbt", &second), key);
        assert!(restore_deps(&cache, &key, &second, Path::new("dbt_packages")).unwrap());
        assert_eq!(
            std::fs::read_to_string(second.join("dbt_packages/hub_pkg/macros/m.sql")).unwrap(),
            "m"
        );
        // The local package resolves into the second run's own checkout.
        assert_eq!(
            std::fs::read_to_string(second.join("dbt_packages/utils/macros/u.sql")).unwrap(),
            "u"
        );
        std::fs::write(second.join("packages.yml"), "packages: [x]\n").unwrap();
        assert_ne!(deps_key("dbt", &second), key);
    }

    #[test]
    fn a_link_out_of_the_project_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let project = dir.path().join("src");
        std::fs::create_dir_all(project.join("dbt_packages")).unwrap();
        std::os::unix::fs::symlink("/etc", project.join("dbt_packages/etc")).unwrap();
        let key = deps_key("dbt", &project);
        let reason = save_deps(&cache, &key, &project, Path::new("dbt_packages"))
            .unwrap()
            .unwrap();
        assert!(reason.contains("links outside the project"), "{reason}");
        assert!(!restore_deps(&cache, &key, &project, Path::new("dbt_packages")).unwrap());
    }
}
