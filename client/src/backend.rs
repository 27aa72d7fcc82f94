//! Where a run builds: on slimci's fleet of agents, or as a run of the repository's dbt Cloud CI
//! job (overflow capacity, `[repository.dbt_cloud] routing`). One definition for the
//! coordinator, the API and the CLI.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Fleet,
    DbtCloud,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Fleet => "fleet",
            Backend::DbtCloud => "dbt_cloud",
        }
    }

    pub fn parse(text: &str) -> Option<Backend> {
        match text {
            "fleet" => Some(Backend::Fleet),
            "dbt_cloud" => Some(Backend::DbtCloud),
            _ => None,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_read_back_as_written() {
        for backend in [Backend::Fleet, Backend::DbtCloud] {
            assert_eq!(Backend::parse(backend.as_str()), Some(backend));
            assert_eq!(
                serde_json::to_string(&backend).unwrap(),
                format!("\"{backend}\"")
            );
        }
        assert_eq!(Backend::parse("lambda"), None);
    }
}
