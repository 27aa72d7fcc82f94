//! The packages cache: what `dbt deps` installed (`dbt_packages/`), per *deps key* (the
//! package files, packages.yml, dependencies.yml and package-lock.yml, and the dbt version).
//!
//! Only deploys write it, right after `dbt deps` and before any of the project's code runs; a
//! build whose package files match restores the tree instead of running dbt. Links dbt made for
//! `local:` packages are stored relative to the project, so they point into each run's own
//! checkout: a restored tree holds no package code of the checkout that saved it.

use std::path::{Component, Path, PathBuf};

use slimci_proto::RunId;

use super::{Origin, digest, package_files};
use crate::cache::{Cache, copy_tree, publish, staging_path};

/// Where the project installs packages (`packages-install-path`, default `dbt_packages`), if
/// it is a plain path inside the project.
pub fn packages_install_path(project: &Path) -> Option<PathBuf> {
    let configured = std::fs::read_to_string(project.join("dbt_project.yml"))
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|value| {
            value
                .get("packages-install-path")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "dbt_packages".to_owned());
    let path = PathBuf::from(&configured);
    path.components()
        .all(|part| matches!(part, Component::Normal(_)))
        .then_some(path)
}

pub fn deps_key(dbt_identity: &str, project: &Path) -> String {
    let packages = package_files(project);
    let mut parts: Vec<&[u8]> = vec![b"deps v2", dbt_identity.as_bytes()];
    parts.extend(packages.iter().map(Vec::as_slice));
    digest(&parts)
}

/// Restores the packages saved for `key` into the project; false if there are none.
pub fn restore_deps(
    cache: &Cache,
    key: &str,
    project: &Path,
    install: &Path,
) -> std::io::Result<bool> {
    let _held = cache.hold("deps", key)?;
    let entry = cache.kind_dir("deps")?.join(key);
    if !entry.join("packages").is_dir() || Origin::read(&entry).is_none() {
        return Ok(false);
    }
    let destination = project.join(install);
    if destination.exists() {
        std::fs::remove_dir_all(&destination)?;
    }
    if let Some(parent) = destination.parent() {
        std::fs::create_dir_all(parent)?;
    }
    copy_tree(&entry.join("packages"), &destination)?;
    let lock = entry.join("package-lock.yml");
    if lock.is_file() && !project.join("package-lock.yml").exists() {
        std::fs::copy(&lock, project.join("package-lock.yml"))?;
    }
    Ok(true)
}

/// Saves what `dbt deps` installed in a production build (`deploy`), before any of the
/// project's code ran. Links to `local:` packages inside the project are stored relative to
/// their place; a link out of the project makes the packages uncacheable (`Ok(Some(reason))`).
pub fn save_deps(
    cache: &Cache,
    key: &str,
    project: &Path,
    install: &Path,
    deploy: RunId,
) -> std::io::Result<Option<String>> {
    let installed = project.join(install);
    if !installed.is_dir() {
        return Ok(Some(format!(
            "dbt deps installed nothing in {}",
            install.display()
        )));
    }
    let _held = cache.hold("deps", key)?;
    let entry = cache.kind_dir("deps")?.join(key);
    if entry.is_dir() {
        return Ok(None);
    }
    let staged = staging_path(&entry);
    std::fs::create_dir_all(&staged)?;
    let result = (|| {
        copy_tree(&installed, &staged.join("packages"))?;
        if let Some(reason) = relativize_links(&staged.join("packages"), &installed, project)? {
            return Ok(Some(reason));
        }
        let lock = project.join("package-lock.yml");
        if lock.is_file() {
            std::fs::copy(&lock, staged.join("package-lock.yml"))?;
        }
        Origin {
            deploy_run_id: deploy,
            sha256: None,
        }
        .write(&staged)?;
        publish(&staged, &entry, false)?;
        Ok(None)
    })();
    if staged.exists() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

/// Rewrites each absolute link under `copy` (a copy of `original`) that points into `project` as
/// a relative one. Returns a reason if a link points elsewhere.
fn relativize_links(
    copy: &Path,
    original: &Path,
    project: &Path,
) -> std::io::Result<Option<String>> {
    for item in std::fs::read_dir(copy)? {
        let item = item?;
        let path = item.path();
        let file_type = item.file_type()?;
        if file_type.is_dir() {
            let relative = path.strip_prefix(copy).unwrap_or(&path).to_owned();
            if let Some(reason) = relativize_links(&path, &original.join(relative), project)? {
                return Ok(Some(reason));
            }
            continue;
        }
        if !file_type.is_symlink() {
            continue;
        }
        let target = std::fs::read_link(&path)?;
        if target.is_relative() {
            continue;
        }
        let Ok(inside) = target.strip_prefix(project) else {
            return Ok(Some(format!(
                "{} links outside the project ({})",
                item.file_name().to_string_lossy(),
                target.display()
            )));
        };
        // From the link's directory back up to the project, then down to the target.
        let link_dir = original
            .join(path.strip_prefix(copy).unwrap_or(&path))
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let depth = link_dir
            .strip_prefix(project)
            .map(|below| below.components().count())
            .unwrap_or(0);
        let mut relative = PathBuf::new();
        for _ in 0..depth {
            relative.push("..");
        }
        relative.push(inside);
        std::fs::remove_file(&path)?;
        std::os::unix::fs::symlink(&relative, &path)?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_round_trip_with_local_links_made_relative() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let first = dir.path().join("run1/src");
        std::fs::create_dir_all(first.join("vendor/utils/macros")).unwrap();
        std::fs::create_dir_all(first.join("dbt_packages/hub_pkg/macros")).unwrap();
        std::fs::write(first.join("dbt_packages/hub_pkg/macros/m.sql"), "m").unwrap();
        std::os::unix::fs::symlink(first.join("vendor/utils"), first.join("dbt_packages/utils"))
            .unwrap();
        std::fs::write(first.join("packages.yml"), "packages: []\n").unwrap();
        let key = deps_key("dbt", &first);
        assert_eq!(
            save_deps(
                &cache,
                &key,
                &first,
                Path::new("dbt_packages"),
                RunId::new()
            )
            .unwrap(),
            None
        );

        let second = dir.path().join("run2/src");
        std::fs::create_dir_all(second.join("vendor/utils/macros")).unwrap();
        std::fs::write(second.join("vendor/utils/macros/u.sql"), "u").unwrap();
        std::fs::write(second.join("packages.yml"), "packages: []\n").unwrap();
        assert_eq!(deps_key("dbt", &second), key);
        assert!(restore_deps(&cache, &key, &second, Path::new("dbt_packages")).unwrap());
        assert_eq!(
            std::fs::read_to_string(second.join("dbt_packages/hub_pkg/macros/m.sql")).unwrap(),
            "m"
        );
        // The local package resolves into the second run's own checkout.
        assert_eq!(
            std::fs::read_to_string(second.join("dbt_packages/utils/macros/u.sql")).unwrap(),
            "u"
        );
        std::fs::write(second.join("packages.yml"), "packages: [x]\n").unwrap();
        assert_ne!(deps_key("dbt", &second), key);
    }

    #[test]
    fn a_link_out_of_the_project_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let project = dir.path().join("src");
        std::fs::create_dir_all(project.join("dbt_packages")).unwrap();
        std::os::unix::fs::symlink("/etc", project.join("dbt_packages/etc")).unwrap();
        let key = deps_key("dbt", &project);
        let reason = save_deps(
            &cache,
            &key,
            &project,
            Path::new("dbt_packages"),
            RunId::new(),
        )
        .unwrap()
        .unwrap();
        assert!(reason.contains("links outside the project"), "{reason}");
        assert!(!restore_deps(&cache, &key, &project, Path::new("dbt_packages")).unwrap());
    }

    #[test]
    fn packages_without_an_origin_are_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"), u64::MAX);
        let project = dir.path().join("src");
        std::fs::create_dir_all(&project).unwrap();
        let key = deps_key("dbt", &project);
        let entry = cache.kind_dir("deps").unwrap().join(&key);
        std::fs::create_dir_all(entry.join("packages/evil")).unwrap();
        assert!(!restore_deps(&cache, &key, &project, Path::new("dbt_packages")).unwrap());
        assert!(!project.join("dbt_packages").exists());
    }
}
