//! A published production manifest (`slimci state publish`): whether the bytes are a dbt
//! manifest at all, and the message its run carries. Reading is streamed from any reader, and
//! only the fields judged are kept (`nodes` by key), so a large manifest costs little memory.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::error::Category;

/// What a published manifest says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFacts {
    /// `metadata.dbt_schema_version`, e.g. `https://schemas.getdbt.com/dbt/manifest/v12.json`.
    pub dbt_schema_version: String,
    /// `metadata.dbt_version`, when given.
    pub dbt_version: Option<String>,
    /// How many entries `nodes` has.
    pub nodes: usize,
}

/// Why a published body is not a dbt manifest; shown to the publisher with HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "the body is not JSON ({0}); send dbt's target/manifest.json as it is, not compressed or wrapped"
    )]
    NotJson(#[source] serde_json::Error),
    #[error(
        "the body is JSON but not a dbt manifest: {0}; send dbt's target/manifest.json (written by `dbt parse`, `dbt build` and the other commands that parse the project)"
    )]
    NotAManifest(String),
}

/// The parts of a manifest judged; everything else is skipped unread.
struct ManifestShape {
    metadata: Option<MetadataShape>,
    nodes: Option<BTreeMap<String, IgnoredAny>>,
}

impl<'de> Deserialize<'de> for ManifestShape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ShapeVisitor)
    }
}

/// Takes only a JSON object (a derived struct would also take an array).
struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = ManifestShape;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ManifestShape, A::Error> {
        let mut shape = ManifestShape {
            metadata: None,
            nodes: None,
        };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "metadata" => shape.metadata = Some(map.next_value()?),
                "nodes" => shape.nodes = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(shape)
    }
}

#[derive(Deserialize)]
struct MetadataShape {
    dbt_schema_version: Option<String>,
    dbt_version: Option<String>,
}

/// Checks that `reader` holds a dbt manifest: a JSON object whose
/// `metadata.dbt_schema_version` names a manifest schema, with a `nodes` object.
pub fn check_manifest(reader: impl Read) -> Result<ManifestFacts, ManifestError> {
    let shape: ManifestShape =
        serde_json::from_reader(reader).map_err(|error| match error.classify() {
            Category::Data => ManifestError::NotAManifest(error.to_string()),
            Category::Syntax | Category::Eof | Category::Io => ManifestError::NotJson(error),
        })?;
    let Some(dbt_schema_version) = shape
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.dbt_schema_version.clone())
    else {
        return Err(ManifestError::NotAManifest(
            "it has no `metadata.dbt_schema_version`".to_owned(),
        ));
    };
    if !dbt_schema_version.contains("manifest") {
        return Err(ManifestError::NotAManifest(format!(
            "its `metadata.dbt_schema_version` is `{dbt_schema_version}`, which is not a manifest's"
        )));
    }
    let Some(nodes) = shape.nodes else {
        return Err(ManifestError::NotAManifest(
            "it has no `nodes` object".to_owned(),
        ));
    };
    Ok(ManifestFacts {
        dbt_schema_version,
        dbt_version: shape.metadata.and_then(|metadata| metadata.dbt_version),
        nodes: nodes.len(),
    })
}

/// Where a published manifest came from, as its run's message says.
pub const FROM_OUTSIDE: &str = "published from outside slimci";

/// The message of a publish run whose manifest came `from` (e.g. [`FROM_OUTSIDE`]).
pub fn published_message(facts: &ManifestFacts, size: u64, from: &str) -> String {
    let schema = facts
        .dbt_schema_version
        .rsplit('/')
        .next()
        .unwrap_or(&facts.dbt_schema_version)
        .trim_end_matches(".json");
    let dbt = facts
        .dbt_version
        .as_deref()
        .map(|version| format!("dbt {version}, "))
        .unwrap_or_default();
    format!(
        "manifest.json {from} ({dbt}schema {schema}, {} nodes, {size} bytes); it is the repository's production state",
        facts.nodes
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{
        "metadata": {
            "dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
            "dbt_version": "1.11.2",
            "invocation_id": "x"
        },
        "nodes": {"model.shop.a": {"resource_type": "model"}, "seed.shop.b": {}},
        "sources": {}
    }"#;

    #[test]
    fn a_manifest_is_accepted_with_what_it_says_of_itself() {
        let facts = check_manifest(MANIFEST.as_bytes()).unwrap();
        assert_eq!(facts.dbt_version.as_deref(), Some("1.11.2"));
        assert_eq!(facts.nodes, 2);
        assert_eq!(
            published_message(&facts, 300, FROM_OUTSIDE),
            "manifest.json published from outside slimci (dbt 1.11.2, schema v12, 2 nodes, 300 bytes); it is the repository's production state"
        );
    }

    #[test]
    fn what_is_not_a_manifest_is_refused_saying_why() {
        let not_json = check_manifest("PK\u{3}\u{4} zip bytes".as_bytes()).unwrap_err();
        assert!(matches!(not_json, ManifestError::NotJson(_)), "{not_json}");
        assert!(not_json.to_string().starts_with("the body is not JSON"));
        let truncated = check_manifest(&MANIFEST.as_bytes()[..40]).unwrap_err();
        assert!(
            matches!(truncated, ManifestError::NotJson(_)),
            "{truncated}"
        );

        let cases = [
            ("[1, 2]", "invalid type: sequence, expected a JSON object"),
            ("3", "invalid type: integer `3`, expected a JSON object"),
            ("{}", "no `metadata.dbt_schema_version`"),
            (
                r#"{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json"}, "results": []}"#,
                "run-results/v6.json`, which is not a manifest's",
            ),
            (
                r#"{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"}}"#,
                "no `nodes` object",
            ),
            (
                r#"{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"}, "nodes": []}"#,
                "invalid type: sequence, expected a map",
            ),
        ];
        for (body, expected) in cases {
            let error = check_manifest(body.as_bytes()).unwrap_err();
            assert!(
                matches!(error, ManifestError::NotAManifest(_)),
                "{body}: {error}"
            );
            assert!(error.to_string().contains(expected), "{body}: {error}");
        }
    }
}
