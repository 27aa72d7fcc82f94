//! Reading a process's TOML configuration file, and the secrets it gives inline or names a file
//! for: the parts the coordinator's and the agent's configurations share. Each keeps its own
//! settings and checks; this crate only reads.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration file or a secret file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what} configuration: {source}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        source: Box<toml::de::Error>,
    },
    #[error("set `{setting}` or `{setting}_file`, not both")]
    InlineAndFile { setting: String },
}

/// Reads and parses the configuration file `path`; `what` names it in errors ("agent").
pub fn load_toml<T: DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<T, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, path, what)
}

/// Parses configuration text read from `path`.
pub fn parse_toml<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    what: &'static str,
) -> Result<T, ConfigFileError> {
    toml::from_str(text).map_err(|source| ConfigFileError::Parse {
        path: path.to_owned(),
        what,
        source: Box::new(source),
    })
}

/// A secret file's contents, without the trailing newline editors add.
pub fn read_secret(path: &Path) -> Result<String, ConfigFileError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })
}

/// The secret `setting`, given inline or as `<setting>_file` (one of them at most).
pub fn inline_or_file(
    setting: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigFileError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigFileError::InlineAndFile {
            setting: setting.to_owned(),
        }),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => read_secret(path).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_inline_or_from_its_file_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(
            inline_or_file("token", &None, &Some(file.clone())).unwrap(),
            Some("s3cret".to_owned())
        );
        assert_eq!(
            inline_or_file("token", &Some("x".into()), &None).unwrap(),
            Some("x".to_owned())
        );
        assert_eq!(inline_or_file("token", &None, &None).unwrap(), None);
        let both = inline_or_file("token", &Some("x".into()), &Some(file)).unwrap_err();
        assert_eq!(both.to_string(), "set `token` or `token_file`, not both");
    }

    #[test]
    fn errors_name_the_file_and_the_kind_of_configuration() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Settings {
            slots: u16,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let missing = load_toml::<Settings>(&path, "agent").unwrap_err();
        assert!(missing.to_string().starts_with("cannot read"), "{missing}");
        std::fs::write(&path, "slots = \"many\"").unwrap();
        let invalid = load_toml::<Settings>(&path, "agent").unwrap_err();
        assert!(
            invalid
                .to_string()
                .contains("is not a valid agent configuration"),
            "{invalid}"
        );
    }
}
