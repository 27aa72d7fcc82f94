//! The state fetch phase (CI runs): the production manifest the job names, from the agent's
//! state cache or downloaded from the coordinator, held until the attempt ends.

use std::path::PathBuf;

use slimci_proto::ProductionStateRef;

use crate::job::attempt_run::AttemptRun;
use crate::job::stop::Stop;

impl AttemptRun<'_> {
    /// Returns the directory holding the production `manifest.json` (dbt's `--state`).
    pub async fn fetch_state(&mut self, state: &ProductionStateRef) -> Result<PathBuf, Stop> {
        let cached = self
            .services
            .states
            .get(&self.services.coordinator, state)
            .await
            .map_err(|error| Stop::error(error.to_string()))?;
        self.holds.push(cached.held);
        let (directory, cached) = (cached.directory, cached.hit);
        self.caches.state = Some(if cached { "hit" } else { "downloaded" }.to_owned());
        self.log.slimci(format_args!(
            "comparing against production state of deploy {} (commit {}, manifest sha256 {}){}",
            state.deploy_run_id,
            state.sha.short(),
            &state.manifest_sha256[..12],
            if cached { ", cached" } else { "" }
        ));
        Ok(directory)
    }
}
