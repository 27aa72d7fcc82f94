//! The parse cache around a build: before it, the saved parse for the attempt's parse key goes
//! into the run's target directory (`reuse::restore_parse`); after it, how dbt parsed (partial
//! or full, and why) and how long loading and parsing took go into the run's cache report, and
//! dbt's new parse is saved for later runs (`reuse::save_parse`).

use std::path::Path;
use std::time::Instant;

use slimci_proto::EventBody;

use crate::cache::blocking;
use crate::job::attempt_run::AttemptRun;
use crate::job::dbt::DbtRun;
use crate::process::Exit;
use crate::reuse::{self, ParseInputs, RestoredParse};

/// The parse restored for a build, with its key (where dbt's new parse is saved).
pub struct ParseSlot {
    key: String,
    restored: RestoredParse,
}

/// What the build's parse is keyed by besides the attempt itself.
pub struct ParseFor<'a> {
    /// The dbt target name (`ci` or `prod`).
    pub target: &'a str,
    /// The profile written for the attempt.
    pub profile: &'a str,
}

impl AttemptRun<'_> {
    /// Puts the saved parse for this attempt's parse key into its target directory. None when
    /// the parse cache is off or unusable.
    pub async fn restore_parse(
        &mut self,
        project: &Path,
        parse_for: ParseFor<'_>,
    ) -> Option<ParseSlot> {
        if !self.services.config.cache.partial_parse {
            return None;
        }
        let env = self.dbt_env();
        let key = reuse::parse_key(&ParseInputs {
            dbt_identity: &self.services.dbt_identity,
            repository: self.job.repository.as_str(),
            project_dir: &self.job.project_dir,
            target: parse_for.target,
            profile: parse_for.profile,
            env: &env,
            project,
        });
        let cache = self.services.cache.clone();
        let target_dir = self.target_dir();
        let restore_key = key.clone();
        let restored =
            blocking(move || reuse::restore_parse(&cache, &restore_key, &target_dir)).await;
        match restored {
            Ok(restored) => {
                if restored.restored {
                    let file = self.target_dir().join(reuse::PARTIAL_PARSE_FILE);
                    if let Err(stop) = self.hand_over(&file) {
                        self.log
                            .slimci(format_args!("saved parse not used: {}", stop.message));
                        let _ = std::fs::remove_file(&file);
                    } else {
                        self.log.slimci(format_args!(
                            "reusing a saved parse (parse key {})",
                            &key[..12]
                        ));
                    }
                }
                Some(ParseSlot { key, restored })
            }
            Err(error) => {
                self.log
                    .slimci(format_args!("parse cache unusable: {error}"));
                None
            }
        }
    }

    /// Records how dbt parsed, saves its new parse for later runs, and reports the caches.
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
        // A build dbt finished (pass or fail) wrote a whole parse; a killed one may not have.
        let ran = &dbt.ran;
        let finished = matches!(ran.exit, Exit::Code(0 | 1)) && ran.oom_kills == 0;
        if let (Some(ParseSlot { key, restored }), true) = (slot, finished) {
            let cache = self.services.cache.clone();
            let target_dir = self.target_dir();
            // `restored` moves in: its hold on the entry lasts until the parse is saved.
            let saved =
                blocking(move || reuse::save_parse(&cache, &key, &target_dir, &restored)).await;
            if let Err(error) = saved {
                self.log.slimci(format_args!("parse not cached: {error}"));
            }
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
}
