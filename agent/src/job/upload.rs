//! The upload phase: the build's `run_results.json` and `manifest.json` to the coordinator's
//! artifact store (a deploy's manifest becomes production state only once it is stored).

use crate::job::attempt_run::AttemptRun;
use crate::job::stop::Stop;

/// The artifacts uploaded, when dbt wrote them.
const ARTIFACTS: [&str; 2] = ["run_results.json", "manifest.json"];

impl AttemptRun<'_> {
    pub async fn upload(&mut self) -> Result<(), Stop> {
        let target = self.target_dir();
        for name in ARTIFACTS {
            let Ok(bytes) = tokio::fs::read(target.join(name)).await else {
                continue;
            };
            self.services
                .coordinator
                .upload_artifact(self.job.run_id, name, bytes)
                .await
                .map_err(|error| Stop::error(format!("uploading {name} failed: {error}")))?;
        }
        Ok(())
    }
}
