//! The parse cache around a build (`reuse::parse`).
//!
//! Before the build, a saved parse goes into the run's target directory: a CI build gets
//! production's parse of the state it compares against (downloaded from that deploy's
//! artifacts when this agent does not have it yet); a deploy gets the last deploy's own. After
//! it, how dbt parsed (partial or full, and why) and how long loading and parsing took go into
//! the run's cache report, and a deploy saves its new parse. A CI build never saves: the PR's
//! code ran in it and could have rewritten the file.

use std::path::Path;
use std::time::{Instant, SystemTime};

use slimci_proto::{EventBody, JobKind, RunId};

use crate::cache::blocking;
use crate::job::attempt_run::AttemptRun;
use crate::job::dbt::DbtRun;
use crate::process::Exit;
use crate::reuse::{self, ParseInputs, RestoreError};

/// How long downloading production's parse may take before the build goes on without it.
const SEED_DOWNLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The parse key of a build, and what its target directory held before dbt ran.
pub struct ParseSlot {
    key: String,
    /// The restored file's length and mtime, to tell whether dbt wrote a new one.
    restored: Option<(u64, SystemTime)>,
}

/// What the build's parse is keyed by besides the attempt itself.
pub struct ParseFor<'a> {
    /// The dbt target name (`ci` or `prod`).
    pub target: &'a str,
    /// The profile written for the attempt.
    pub profile: &'a str,
}

fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.len(), metadata.modified().ok()?))
}

impl AttemptRun<'_> {
    /// The parse key of a dbt invocation of this attempt in `project` (its environment as
    /// `dbt_env` gives it now).
    pub fn parse_key(&self, project: &Path, parse_for: &ParseFor<'_>) -> String {
        reuse::parse_key(&ParseInputs {
            dbt_identity: &self.services.dbt_identity,
            repository: self.job.repository.as_str(),
            project_dir: &self.job.project_dir,
            target: parse_for.target,
            profile: parse_for.profile,
            env: &self.dbt_env(),
            project,
        })
    }

    /// Puts the saved parse for this build's parse key into its target directory. None when
    /// the parse cache is off or unusable.
    pub async fn restore_parse(
        &mut self,
        project: &Path,
        parse_for: ParseFor<'_>,
    ) -> Option<ParseSlot> {
        if !self.services.config.cache.partial_parse {
            return None;
        }
        let key = self.parse_key(project, &parse_for);
        match self.services.cache.hold("parse", &key) {
            Ok(held) => self.holds.push(held),
            Err(error) => {
                self.log
                    .slimci(format_args!("parse cache unusable: {error}"));
                return None;
            }
        }
        let production = match &self.job.kind {
            JobKind::Ci {
                production_state, ..
            } => Some(production_state.deploy_run_id),
            JobKind::Deploy | JobKind::Teardown { .. } => None,
        };
        if let Some(deploy) = production {
            let current = reuse::saved_origin(&self.services.cache, &key);
            if current.is_none_or(|origin| origin.deploy_run_id != deploy) {
                self.download_production_parse(&key, deploy).await;
            }
        }
        let mut restored = self.restore_saved_parse(&key).await;
        if let (Err(error @ RestoreError::Damaged { .. }), Some(deploy)) = (&restored, production) {
            self.log.slimci(format_args!("{error}; fetching it again"));
            if self.download_production_parse(&key, deploy).await {
                restored = self.restore_saved_parse(&key).await;
            }
        }
        let short = &key[..12];
        match restored {
            Ok(Some(origin)) => {
                let file = self.target_dir().join(reuse::PARTIAL_PARSE_FILE);
                if let Err(stop) = self.hand_over(&file) {
                    self.log
                        .slimci(format_args!("saved parse not used: {}", stop.message));
                    let _ = std::fs::remove_file(&file);
                } else {
                    self.caches.parse_from = Some(origin.deploy_run_id);
                    self.log.slimci(format_args!(
                        "starting from the parse deploy {} saved (parse key {short})",
                        origin.deploy_run_id
                    ));
                }
            }
            Ok(None) => self.log.slimci(format_args!(
                "no saved parse for this build's parse inputs (parse key {short})"
            )),
            Err(error) => self
                .log
                .slimci(format_args!("{error}; dbt will parse the whole project")),
        }
        Some(ParseSlot {
            restored: stamp(&self.target_dir().join(reuse::PARTIAL_PARSE_FILE)),
            key,
        })
    }

    async fn restore_saved_parse(&self, key: &str) -> Result<Option<reuse::Origin>, RestoreError> {
        let (cache, key, target_dir) = (
            self.services.cache.clone(),
            key.to_owned(),
            self.target_dir(),
        );
        tokio::task::spawn_blocking(move || reuse::restore_parse(&cache, &key, &target_dir))
            .await
            .unwrap_or_else(|error| Err(RestoreError::Io(std::io::Error::other(error))))
    }

    /// Downloads the parse deploy `deploy` published for CI builds with `key` and saves it in
    /// the parse cache. Returns whether it did; says in the log why not.
    async fn download_production_parse(&mut self, key: &str, deploy: RunId) -> bool {
        let name = reuse::seed_artifact_name(key);
        let download = tokio::time::timeout(
            SEED_DOWNLOAD_TIMEOUT,
            self.services.coordinator.download_artifact(deploy, &name),
        )
        .await;
        let bytes = match download {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => {
                self.log.slimci(format_args!(
                    "deploy {deploy} published no parse for this build's parse inputs \
                     (dbt_project.yml, packages, profile or dbt differ from production's)"
                ));
                return false;
            }
            Ok(Err(error)) => {
                self.log.slimci(format_args!(
                    "could not download production's parse from deploy {deploy}: {error}"
                ));
                return false;
            }
            Err(_) => {
                self.log.slimci(format_args!(
                    "downloading production's parse from deploy {deploy} took over {} s; going on without it",
                    SEED_DOWNLOAD_TIMEOUT.as_secs()
                ));
                return false;
            }
        };
        let (cache, key_owned, size) = (self.services.cache.clone(), key.to_owned(), bytes.len());
        match blocking(move || reuse::save_parse(&cache, &key_owned, &bytes, deploy)).await {
            Ok(_) => {
                self.log.slimci(format_args!(
                    "downloaded production's parse from deploy {deploy} ({:.1} MB)",
                    size as f64 / 1e6
                ));
                true
            }
            Err(error) => {
                self.log.slimci(format_args!(
                    "could not save production's parse from deploy {deploy}: {error}"
                ));
                false
            }
        }
    }

    /// Records how dbt parsed, saves a deploy's new parse for the next deploy, and reports the
    /// caches.
    pub async fn after_parse(&mut self, slot: Option<ParseSlot>, dbt: &DbtRun) {
        let (mode, reason) = reuse::parse_mode(&self.run_dir.join("logs").join("dbt.log"));
        let seconds = |from: Option<Instant>, to: Option<Instant>| {
            Some(((to? - from?).as_secs_f64() * 1000.0).round() / 1000.0)
        };
        let timing = dbt.timing;
        self.caches.dbt_startup_s = seconds(Some(timing.spawned), timing.loaded);
        self.caches.parse_s = seconds(timing.loaded, timing.parsed);
        self.caches.parse = Some(mode.to_owned());
        self.caches.parse_reason = reason;
        if mode != "partial" {
            self.caches.parse_from = None;
        }
        // A build dbt finished (pass or fail) wrote a whole parse; a killed one may not have.
        let ran = &dbt.ran;
        let finished = matches!(ran.exit, Exit::Code(0 | 1)) && ran.oom_kills == 0;
        if let (Some(slot), true, JobKind::Deploy) = (slot, finished, &self.job.kind) {
            self.save_own_parse(slot).await;
        }
        match &self.caches.parse_reason {
            Some(reason) => self
                .log
                .slimci(format_args!("dbt parsed the whole project: {reason}")),
            None if mode == "partial" => self.log.slimci("dbt reused the saved parse"),
            None => {}
        }
        self.reporter.send(EventBody::Caches(self.caches.clone()));
    }

    /// Saves the parse this deploy's dbt wrote, if it wrote a new one.
    async fn save_own_parse(&mut self, slot: ParseSlot) {
        let file = self.target_dir().join(reuse::PARTIAL_PARSE_FILE);
        let now = stamp(&file);
        if now.is_none() || now == slot.restored {
            return;
        }
        let (cache, deploy) = (self.services.cache.clone(), self.job.run_id);
        let saved = blocking(move || {
            let bytes = std::fs::read(&file)?;
            reuse::save_parse(&cache, &slot.key, &bytes, deploy)
        })
        .await;
        if let Err(error) = saved {
            self.log.slimci(format_args!("parse not cached: {error}"));
        }
    }
}
