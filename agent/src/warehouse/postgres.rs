//! The PostgreSQL warehouse: a server the agent reaches over the network, with credentials
//! from the agent's configuration. Where production is (database and schema) and where PR
//! schemas go is the repository's (`RepositoryWarehouse`, from the job).
//!
//! A deploy builds production in place (`dbt build --target prod` into the production
//! schema); a PR builds into the schema named by its isolation, `pr_<slug>_<n>`, and
//! `pr_<slug>_<n>_<custom>` for models with a custom schema (dbt's default
//! `generate_schema_name`), in the same database, reading unchanged parents from production
//! through the production manifest (`--defer`). A teardown drops exactly those schemas.

use crate::config::{POSTGRES_PASSWORD, secret_env_name};

use super::SchemaTarget;

#[derive(Clone)]
pub struct PostgresWarehouse {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub sslmode: Option<String>,
    pub threads: u32,
}

impl PostgresWarehouse {
    /// The profile's output for `target`. The password is read from the environment
    /// (`DBT_ENV_SECRET_POSTGRES_PASSWORD`), never written to disk.
    pub fn profile_output(&self, target: &SchemaTarget) -> serde_json::Value {
        let password = secret_env_name(POSTGRES_PASSWORD);
        let mut output = serde_json::json!({
            "type": "postgres",
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": format!("{{{{ env_var('{password}') }}}}"),
            "dbname": target.database,
            "schema": target.schema,
            "threads": self.threads,
            "connect_timeout": 10,
            "application_name": target.session_label,
        });
        if let Some(sslmode) = &self.sslmode {
            output["sslmode"] = serde_json::Value::String(sslmode.clone());
        }
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warehouse::{Purpose, Target, Warehouse, referenced_variables};

    #[test]
    fn the_profile_points_at_the_targets_schema_and_reads_the_password_from_the_environment() {
        let warehouse = Warehouse::Postgres(PostgresWarehouse {
            host: "db.internal".into(),
            port: 5433,
            user: "slimci".into(),
            sslmode: Some("require".into()),
            threads: 4,
        });
        let target = Target::Schema(SchemaTarget {
            purpose: Purpose::Ci,
            database: "analytics".into(),
            schema: "pr_shop_7".into(),
            session_label: "slimci 01a2 shop pr 7".into(),
            query_tag: String::new(),
            role: None,
            compute: None,
        });
        let yaml = warehouse.profile_yaml("shop", &target, "../");
        for expected in [
            "target: ci",
            "type: postgres",
            "host: db.internal",
            "port: 5433",
            "dbname: analytics",
            "schema: pr_shop_7",
            "sslmode: require",
            "application_name: slimci 01a2 shop pr 7",
        ] {
            assert!(yaml.contains(expected), "{expected} in {yaml}");
        }
        assert_eq!(
            referenced_variables(&yaml),
            ["DBT_ENV_SECRET_POSTGRES_PASSWORD"]
        );
        let deploy = Target::Schema(SchemaTarget {
            purpose: Purpose::Deploy,
            database: "analytics".into(),
            schema: "analytics".into(),
            session_label: "slimci 01a2 shop deploy".into(),
            query_tag: String::new(),
            role: None,
            compute: None,
        });
        let yaml = warehouse.profile_yaml("shop", &deploy, "../");
        assert!(yaml.contains("target: prod"), "{yaml}");
        assert!(yaml.contains("schema: analytics"), "{yaml}");
    }
}
