//! The Snowflake warehouse: an account the agent reaches over https, with credentials from the
//! agent's configuration (key-pair authentication, or a password only if asked for). Where
//! production is (database and schema) and the database PR schemas go in is the repository's
//! (`RepositoryWarehouse`, from the job).
//!
//! As with PostgreSQL, a deploy builds production in place and a PR builds into schemas
//! `pr_<slug>_<n>` and `pr_<slug>_<n>_<custom>` (Snowflake folds them to upper case) of the CI
//! database, reading unchanged parents from production through the production manifest. Every
//! session carries the run in its `query_tag`, so a team can sum credits per PR from
//! `QUERY_HISTORY`.
//!
//! The private key reaches a build as a file in its own run directory (`KEY_FILE`, readable by
//! the build user, removed with the run directory); its passphrase and a password reach dbt
//! only as `DBT_ENV_SECRET_*` variables.

use crate::config::{SNOWFLAKE_PASSWORD, SNOWFLAKE_PRIVATE_KEY_PASSPHRASE, secret_env_name};

use super::SchemaTarget;

/// Where a build's copy of the private key is, relative to its run directory.
pub const KEY_FILE: &str = "secrets/snowflake_key.p8";

#[derive(Clone)]
pub enum SnowflakeAuth {
    /// `private_key_path`, with a passphrase if the key is encrypted.
    KeyPair {
        passphrase: bool,
    },
    Password,
}

#[derive(Clone)]
pub struct SnowflakeWarehouse {
    pub account: String,
    pub user: String,
    pub role: Option<String>,
    pub warehouse: Option<String>,
    pub auth: SnowflakeAuth,
    pub threads: u32,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
}

impl SnowflakeWarehouse {
    /// The profile's output for `target`; `up` leads from the project directory back to the
    /// run directory (where the key file is).
    pub fn profile_output(&self, target: &SchemaTarget, up: &str) -> serde_json::Value {
        let env = |name: &str| format!("{{{{ env_var('{}') }}}}", secret_env_name(name));
        let mut output = serde_json::json!({
            "type": "snowflake",
            "account": self.account,
            "user": self.user,
            "database": target.database,
            "schema": target.schema,
            "threads": self.threads,
            "query_tag": target.query_tag,
            "client_session_keep_alive": false,
            "connect_timeout": 30,
            "connect_retries": 0,
        });
        match self.auth {
            SnowflakeAuth::KeyPair { passphrase } => {
                output["private_key_path"] = format!("{up}{KEY_FILE}").into();
                if passphrase {
                    output["private_key_passphrase"] = env(SNOWFLAKE_PRIVATE_KEY_PASSPHRASE).into();
                }
            }
            SnowflakeAuth::Password => output["password"] = env(SNOWFLAKE_PASSWORD).into(),
        }
        // The repository's role and warehouse, where it sets them, over the agent's.
        for (key, value) in [
            ("role", target.role.as_ref().or(self.role.as_ref())),
            (
                "warehouse",
                target.compute.as_ref().or(self.warehouse.as_ref()),
            ),
            ("host", self.host.as_ref()),
            ("protocol", self.protocol.as_ref()),
        ] {
            if let Some(value) = value {
                output[key] = value.clone().into();
            }
        }
        if let Some(port) = self.port {
            output["port"] = port.into();
        }
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warehouse::{Purpose, Target, Warehouse, referenced_variables};

    fn warehouse(auth: SnowflakeAuth) -> Warehouse {
        Warehouse::Snowflake(SnowflakeWarehouse {
            account: "xy12345.eu-west-1".into(),
            user: "SLIMCI".into(),
            role: Some("SLIMCI_CI".into()),
            warehouse: Some("SLIMCI_WH".into()),
            auth,
            threads: 8,
            host: None,
            port: None,
            protocol: None,
        })
    }

    fn ci_target() -> Target {
        Target::Schema(SchemaTarget {
            purpose: Purpose::Ci,
            database: "ANALYTICS_CI".into(),
            schema: "pr_shop_7".into(),
            session_label: "slimci r shop pr 7".into(),
            query_tag: r#"{"app":"slimci","repo":"shop","pr":7}"#.into(),
            role: None,
            compute: None,
        })
    }

    #[test]
    fn a_repositorys_role_and_warehouse_win_over_the_agents() {
        let Target::Schema(mut target) = ci_target() else {
            unreachable!()
        };
        target.role = Some("SHOP_CI".into());
        target.compute = Some("SHOP_WH".into());
        let yaml = warehouse(SnowflakeAuth::KeyPair { passphrase: false }).profile_yaml(
            "shop",
            &Target::Schema(target),
            "../",
        );
        assert!(yaml.contains("role: SHOP_CI"), "{yaml}");
        assert!(yaml.contains("warehouse: SHOP_WH"), "{yaml}");
        assert!(!yaml.contains("SLIMCI_CI"), "{yaml}");
    }

    #[test]
    fn a_key_pair_profile_reads_the_runs_key_file_and_the_passphrase_from_the_environment() {
        let yaml = warehouse(SnowflakeAuth::KeyPair { passphrase: true }).profile_yaml(
            "shop",
            &ci_target(),
            "../",
        );
        for expected in [
            "target: ci",
            "type: snowflake",
            "account: xy12345.eu-west-1",
            "database: ANALYTICS_CI",
            "schema: pr_shop_7",
            "role: SLIMCI_CI",
            "warehouse: SLIMCI_WH",
            "private_key_path: ../secrets/snowflake_key.p8",
            r#"query_tag: '{"app":"slimci","repo":"shop","pr":7}'"#,
        ] {
            assert!(yaml.contains(expected), "{expected} in {yaml}");
        }
        assert!(!yaml.contains("password:"), "{yaml}");
        assert_eq!(
            referenced_variables(&yaml),
            ["DBT_ENV_SECRET_SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"]
        );
    }

    #[test]
    fn a_password_profile_reads_the_password_from_the_environment() {
        let yaml = warehouse(SnowflakeAuth::Password).profile_yaml("shop", &ci_target(), "../");
        assert!(!yaml.contains("private_key"), "{yaml}");
        assert_eq!(
            referenced_variables(&yaml),
            ["DBT_ENV_SECRET_SNOWFLAKE_PASSWORD"]
        );
    }
}
