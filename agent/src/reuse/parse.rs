//! The parse cache: one saved `partial_parse.msgpack` per *parse key* (the digest of everything
//! dbt checks before it reuses a parse, and of what decides which saved parse fits), written
//! only by production builds.
//!
//! Two writers, both deploys: a deploy's own parse (target `prod`), saved after its build for
//! the next deploy; and the *seed*, production's code parsed with the CI profile after a
//! successful deploy (`job::seed`), published as the deploy's artifact
//! `seed_artifact_name(key)` and saved here. A CI build looks its key up here; when the entry
//! is older than the production state the build compares against, the agent downloads that
//! deploy's seed first (`job::parse_cache`).
//!
//! An entry is `parse/<key>/partial_parse.msgpack` with `origin.json` (the deploy and the file's
//! sha256). It is written aside and renamed into place whole; a restore checks the bytes it
//! puts into the run against the recorded sha256, so a damaged file never reaches dbt. dbt still
//! checks every input itself: a saved parse can make a parse faster, never wrong.

use std::io::BufRead;
use std::path::Path;

use slimci_proto::RunId;

use super::{Origin, digest, package_files, sha256_hex};
use crate::cache::{Cache, publish, staging_path};

pub const PARTIAL_PARSE_FILE: &str = "partial_parse.msgpack";

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
        b"parse v2",
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

/// The name of a deploy's artifact holding production's parse for CI builds with `key`.
pub fn seed_artifact_name(key: &str) -> String {
    format!("ci-parse-{key}.msgpack")
}

/// Saves `bytes`, a parse a production build (`deploy`) wrote, as the entry for `key`,
/// replacing the one there. Returns the entry's origin.
pub fn save_parse(
    cache: &Cache,
    key: &str,
    bytes: &[u8],
    deploy: RunId,
) -> std::io::Result<Origin> {
    let entry = cache.kind_dir("parse")?.join(key);
    let staged = staging_path(&entry);
    std::fs::create_dir(&staged)?;
    let origin = Origin {
        deploy_run_id: deploy,
        sha256: Some(sha256_hex(bytes)),
    };
    let written = std::fs::write(staged.join(PARTIAL_PARSE_FILE), bytes)
        .and_then(|()| origin.write(&staged))
        .and_then(|()| publish(&staged, &entry, true));
    if staged.exists() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    written.map(|()| origin)
}

/// Who wrote the entry for `key`, if there is one.
pub fn saved_origin(cache: &Cache, key: &str) -> Option<Origin> {
    Origin::read(&cache.root().join("parse").join(key))
}

/// Why a saved parse was not restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "the saved parse of deploy {deploy} is damaged (its sha256 is {found}, not {expected})"
    )]
    Damaged {
        deploy: RunId,
        expected: String,
        found: String,
    },
    #[error("reading the saved parse: {0}")]
    Io(#[from] std::io::Error),
}

/// Puts the saved parse for `key`, if any, into `target_dir/partial_parse.msgpack`, after
/// checking its bytes against the sha256 its writer recorded. Returns its origin.
pub fn restore_parse(
    cache: &Cache,
    key: &str,
    target_dir: &Path,
) -> Result<Option<Origin>, RestoreError> {
    let entry = cache.kind_dir("parse")?.join(key);
    let Some(origin) = Origin::read(&entry) else {
        return Ok(None);
    };
    let bytes = match std::fs::read(entry.join(PARTIAL_PARSE_FILE)) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let found = sha256_hex(&bytes);
    if origin.sha256.as_deref() != Some(found.as_str()) {
        return Err(RestoreError::Damaged {
            deploy: origin.deploy_run_id,
            expected: origin.sha256.unwrap_or_default(),
            found,
        });
    }
    std::fs::write(target_dir.join(PARTIAL_PARSE_FILE), &bytes)?;
    Ok(Some(origin))
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
    fn a_saved_parse_comes_back_with_its_origin_and_a_newer_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        assert!(restore_parse(&cache, "k", &target).unwrap().is_none());
        assert!(saved_origin(&cache, "k").is_none());

        let (first, second) = (RunId::new(), RunId::new());
        save_parse(&cache, "k", b"first", first).unwrap();
        let origin = restore_parse(&cache, "k", &target).unwrap().unwrap();
        assert_eq!(origin.deploy_run_id, first);
        assert_eq!(
            std::fs::read(target.join(PARTIAL_PARSE_FILE)).unwrap(),
            b"first"
        );

        save_parse(&cache, "k", b"second", second).unwrap();
        assert_eq!(saved_origin(&cache, "k").unwrap().deploy_run_id, second);
        restore_parse(&cache, "k", &target).unwrap().unwrap();
        assert_eq!(
            std::fs::read(target.join(PARTIAL_PARSE_FILE)).unwrap(),
            b"second"
        );
    }

    #[test]
    fn a_damaged_saved_parse_is_never_put_into_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let deploy = RunId::new();
        save_parse(&cache, "k", b"the parse", deploy).unwrap();
        let file = cache.root().join("parse/k").join(PARTIAL_PARSE_FILE);
        std::fs::write(&file, b"the pARSE").unwrap();
        let error = restore_parse(&cache, "k", &target).unwrap_err();
        assert!(
            matches!(&error, RestoreError::Damaged { deploy: d, .. } if *d == deploy),
            "{error}"
        );
        assert!(error.to_string().contains("damaged"), "{error}");
        assert!(!target.join(PARTIAL_PARSE_FILE).exists());
        // A new save mends it.
        save_parse(&cache, "k", b"the parse", deploy).unwrap();
        assert!(restore_parse(&cache, "k", &target).unwrap().is_some());
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
}
