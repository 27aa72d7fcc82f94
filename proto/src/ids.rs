//! Identifier newtypes. Each validates on construction, so a value of one of these types is
//! always well-formed, and serde goes through the same validation.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "`{0}` is not a commit SHA: expected 40 (SHA-1) or 64 (SHA-256) hexadecimal characters"
    )]
    Sha(String),
    #[error(
        "`{0}` is not a repository name: use 1 to 100 characters of letters, digits, `-`, `_`, `.` and `/`"
    )]
    RepoName(String),
    #[error(
        "`{0}` is not an agent name: use 1 to 64 characters of letters, digits, `-`, `_` and `.`"
    )]
    AgentName(String),
    #[error("`{0}` is not a run id (expected a UUID)")]
    RunId(String),
    #[error(
        "`{0}` is not a PR isolation name: expected `pr_<slug>_<number>` in lower-case letters, digits and `_`, at most 63 bytes"
    )]
    IsolationName(String),
}

/// A run, as the coordinator records it. UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub Uuid);

impl RunId {
    pub fn new() -> RunId {
        RunId(Uuid::now_v7())
    }

    pub fn parse(text: &str) -> Result<RunId, IdError> {
        Uuid::parse_str(text)
            .map(RunId)
            .map_err(|_| IdError::RunId(text.to_owned()))
    }
}

impl Default for RunId {
    fn default() -> Self {
        RunId::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which attempt of a run, starting at 1. A retry is a new attempt; events of any other attempt
/// than the current one are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A pull request number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PrNumber(pub u64);

impl fmt::Display for PrNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! validated_string {
    ($name:ident, $check:expr) => {
        impl $name {
            pub fn parse(text: &str) -> Result<$name, IdError> {
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(text)?;
                Ok($name(text.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $name::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A full commit id, lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sha(String);

validated_string!(Sha, |text| {
    let hex = text
        .bytes()
        .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    if hex && (text.len() == 40 || text.len() == 64) {
        Ok(())
    } else {
        Err(IdError::Sha(text.to_owned()))
    }
});

impl Sha {
    /// The first 12 characters, for people.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

/// A configured repository's name, as the coordinator's configuration spells it
/// (`shop`, `acme/analytics`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

validated_string!(RepoName, |text| {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
    if (1..=100).contains(&text.len()) && text.chars().all(allowed) && !text.contains("..") {
        Ok(())
    } else {
        Err(IdError::RepoName(text.to_owned()))
    }
});

impl RepoName {
    /// The repository name as an identifier fragment: lower-case letters, digits and `_`.
    /// Distinct repositories may share a slug (`a-b`, `a_b`); the coordinator refuses such a
    /// configuration, so within one deployment the slug is unique.
    pub fn slug(&self) -> String {
        self.0
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// The name of a runner agent, unique in the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName(String);

validated_string!(AgentName, |text| {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if (1..=64).contains(&text.len()) && text.chars().all(allowed) {
        Ok(())
    } else {
        Err(IdError::AgentName(text.to_owned()))
    }
});

/// The schema or database a pull request builds into: `pr_<repository slug>_<number>`.
///
/// Stable across the commits of one PR, unique across repositories (the slug is unique within a
/// deployment), and a valid unquoted identifier on every warehouse slimci targets. Nothing that
/// does not have this shape is ever dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct IsolationName(String);

/// Postgres truncates identifiers at 63 bytes; keep every isolation name under that.
const MAX_ISOLATION_LEN: usize = 63;

impl IsolationName {
    pub fn for_pr(repository: &RepoName, pr: PrNumber) -> IsolationName {
        let suffix = format!("_{}", pr.0);
        let mut slug = repository.slug();
        slug.truncate(MAX_ISOLATION_LEN - "pr_".len() - suffix.len());
        IsolationName(format!("pr_{slug}{suffix}"))
    }

    /// Whether `name` is a PR isolation of `repository`, and of which PR.
    pub fn pr_of(repository: &RepoName, name: &str) -> Option<PrNumber> {
        let digits = name.rsplit_once('_')?.1;
        let pr = PrNumber(digits.parse().ok()?);
        (IsolationName::for_pr(repository, pr).0 == name).then_some(pr)
    }

    /// A name read back (from a job, the store): only the shape of a PR isolation passes.
    pub fn parse(text: &str) -> Result<IsolationName, IdError> {
        let valid = text.starts_with("pr_")
            && text.len() <= MAX_ISOLATION_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && text
                .rsplit_once('_')
                .is_some_and(|(_, n)| n.parse::<u64>().is_ok());
        if valid {
            Ok(IsolationName(text.to_owned()))
        } else {
            Err(IdError::IsolationName(text.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IsolationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for IsolationName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        IsolationName::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_accepts_full_hex_only() {
        assert!(Sha::parse("0123456789abcdef0123456789abcdef01234567").is_ok());
        assert!(Sha::parse(&"a".repeat(64)).is_ok());
        assert!(Sha::parse("0123456").is_err());
        assert!(Sha::parse("0123456789ABCDEF0123456789abcdef01234567").is_err());
        assert!(Sha::parse("g123456789abcdef0123456789abcdef01234567").is_err());
        let error = Sha::parse("xyz").unwrap_err().to_string();
        assert!(
            error.contains("40 (SHA-1) or 64 (SHA-256) hexadecimal"),
            "{error}"
        );
    }

    #[test]
    fn repo_names_are_restricted() {
        assert!(RepoName::parse("acme/analytics-dbt").is_ok());
        assert!(RepoName::parse("").is_err());
        assert!(RepoName::parse("../etc").is_err());
        assert!(RepoName::parse("a b").is_err());
    }

    #[test]
    fn isolation_names_are_stable_and_recognised() {
        let repo = RepoName::parse("Acme/Analytics-dbt").unwrap();
        let name = IsolationName::for_pr(&repo, PrNumber(42));
        assert_eq!(name.as_str(), "pr_acme_analytics_dbt_42");
        assert_eq!(
            IsolationName::pr_of(&repo, name.as_str()),
            Some(PrNumber(42))
        );
        assert_eq!(IsolationName::pr_of(&repo, "analytics"), None);
        assert_eq!(IsolationName::pr_of(&repo, "pr_other_42"), None);
        assert_eq!(IsolationName::pr_of(&repo, "pr_acme_analytics_dbt_x"), None);
    }

    #[test]
    fn isolation_names_fit_identifier_limits() {
        let repo = RepoName::parse(&"r".repeat(100)).unwrap();
        let name = IsolationName::for_pr(&repo, PrNumber(u64::MAX));
        assert!(name.as_str().len() <= 63, "{name}");
        assert_eq!(
            IsolationName::pr_of(&repo, name.as_str()),
            Some(PrNumber(u64::MAX))
        );
    }
}
