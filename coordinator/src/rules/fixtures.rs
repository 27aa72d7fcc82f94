//! Test fixtures shared by the rules' unit tests.

use crate::config::Config;
use crate::rules::RunRequest;

pub fn config() -> Config {
    toml::from_str(
        r#"
        data_dir = "/tmp/x"
        [amqp]
        url = "amqp://127.0.0.1"
        [auth]
        agent_token = "0123456789abcdef"
        [[repository]]
        name = "shop"
        clone_url = "/srv/shop.git"
        production_branch = "trunk"
        "#,
    )
    .unwrap()
}

pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

pub fn ci(pr: Option<u64>, sha: Option<&str>) -> RunRequest {
    RunRequest {
        repository: "shop".into(),
        pr,
        sha: sha.map(Into::into),
        ..Default::default()
    }
}
