//! The agent's disk caches, bounded in size with least-recently-used eviction.
//!
//! Layout under `cache.dir` (default `<work_dir>/cache`):
//! ```text
//! git/<slug>.git            bare repository per repository (fetches only what it lacks)
//! state/<sha256>/           a production manifest, by its digest
//! parse/<key>/              dbt's partial_parse.msgpack, by what dbt checks before reusing it
//! deps/<key>/               an installed dbt_packages tree, by the package files' hash
//! <kind>/<name>.lock        one per entry: shared while a build uses it, exclusive to evict it;
//!                           its mtime is the entry's last use
//! ```
//! Every key is a digest of everything the entry depends on, so a stale entry is never found:
//! a different input is a different name. Entries are written under a temporary name and
//! renamed into place, so a reader sees a whole entry or none.
//!
//! `evict` removes the least recently used entries until the total is under `max_bytes`,
//! skipping any entry a build holds. It runs after every attempt and at start.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

/// The kinds of entry, each a directory under the cache root.
pub const KINDS: [&str; 4] = ["git", "state", "parse", "deps"];

pub struct Cache {
    root: PathBuf,
    max_bytes: u64,
}

/// A build's hold on an entry: eviction skips it until dropped.
pub struct Held {
    _lock: Flock<File>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Held")
    }
}

/// What one eviction pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub total_bytes: u64,
    pub removed: Vec<String>,
    pub removed_bytes: u64,
    /// Entries that should have gone but a build was using them.
    pub busy: usize,
}

fn lock_path(entry: &Path) -> PathBuf {
    let mut name = entry.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    entry.with_file_name(name)
}

/// The entry's lock file, created if missing (never truncated: its mtime is the last use).
fn open_lock(lock: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock)
}

/// Bytes on disk under `path` (files and symlinks themselves; symlinks are not followed).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !metadata.is_dir() {
        return metadata.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| disk_usage(&entry.path()))
        .sum()
}

impl Cache {
    pub fn new(root: PathBuf, max_bytes: u64) -> Cache {
        Cache { root, max_bytes }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of one kind of entry, created if missing.
    pub fn kind_dir(&self, kind: &str) -> std::io::Result<PathBuf> {
        let directory = self.root.join(kind);
        std::fs::create_dir_all(&directory)?;
        Ok(directory)
    }

    /// Holds the entry `name` of `kind` for a build (whether or not it exists yet) and marks it
    /// used. Eviction leaves it alone until the returned hold is dropped.
    pub fn hold(&self, kind: &str, name: &str) -> std::io::Result<Held> {
        let entry = self.kind_dir(kind)?.join(name);
        Self::hold_path(&entry, FlockArg::LockShared)
    }

    /// Holds `entry` exclusively (blocking), for writers that must not race each other.
    pub fn hold_exclusive(entry: &Path) -> std::io::Result<Held> {
        Self::hold_path(entry, FlockArg::LockExclusive)
    }

    fn hold_path(entry: &Path, how: FlockArg) -> std::io::Result<Held> {
        let file = open_lock(&lock_path(entry))?;
        // The lock file's mtime is the entry's last use.
        file.set_modified(SystemTime::now())?;
        let lock = Flock::lock(file, how).map_err(|(_, errno)| std::io::Error::from(errno))?;
        Ok(Held { _lock: lock })
    }

    /// The entries of one kind, by name and path: neither their lock files nor writers'
    /// temporaries (dot-names).
    pub fn entries(&self, kind: &str) -> Vec<(String, PathBuf)> {
        let Ok(listing) = std::fs::read_dir(self.root.join(kind)) else {
            return Vec::new();
        };
        listing
            .filter_map(Result::ok)
            .map(|item| (item.file_name().to_string_lossy().into_owned(), item.path()))
            .filter(|(name, _)| !name.ends_with(".lock") && !name.starts_with('.'))
            .collect()
    }

    /// Removes least-recently-used entries until the cache is within its size limit.
    pub fn evict(&self) -> Evicted {
        struct Entry {
            path: PathBuf,
            label: String,
            bytes: u64,
            used: SystemTime,
        }
        let mut entries = Vec::new();
        for kind in KINDS {
            for (name, path) in self.entries(kind) {
                let used = std::fs::metadata(lock_path(&path))
                    .or_else(|_| std::fs::symlink_metadata(&path))
                    .and_then(|metadata| metadata.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push(Entry {
                    bytes: disk_usage(&path),
                    label: format!("{kind}/{name}"),
                    path,
                    used,
                });
            }
        }
        let mut evicted = Evicted {
            total_bytes: entries.iter().map(|entry| entry.bytes).sum(),
            ..Evicted::default()
        };
        entries.sort_by_key(|entry| entry.used);
        let mut total = evicted.total_bytes;
        for entry in entries {
            if total <= self.max_bytes {
                break;
            }
            let lock = lock_path(&entry.path);
            let Ok(file) = open_lock(&lock) else {
                continue;
            };
            let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                evicted.busy += 1;
                continue;
            };
            let removed = if entry.path.is_dir() {
                std::fs::remove_dir_all(&entry.path)
            } else {
                std::fs::remove_file(&entry.path)
            };
            match removed {
                Ok(()) => {
                    total -= entry.bytes;
                    evicted.removed_bytes += entry.bytes;
                    evicted.removed.push(entry.label);
                    let _ = std::fs::remove_file(&lock);
                }
                Err(error) => {
                    tracing::warn!(%error, entry = %entry.path.display(), "cache: could not evict");
                }
            }
        }
        evicted.total_bytes = total;
        evicted
    }
}

/// Copies a directory tree (files, directories and symlinks as they are), for restoring a
/// cached tree into a build or saving one from it. `destination` must not exist.
pub fn copy_tree(source: &Path, destination: &Path) -> std::io::Result<u64> {
    let metadata = std::fs::symlink_metadata(source)?;
    if metadata.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(source)?, destination)?;
        return Ok(0);
    }
    if !metadata.is_dir() {
        return std::fs::copy(source, destination);
    }
    std::fs::create_dir(destination)?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(source)? {
        let entry = entry?;
        bytes += copy_tree(&entry.path(), &destination.join(entry.file_name()))?;
    }
    Ok(bytes)
}

/// A fresh temporary name beside `entry`, for writing it before renaming it into place.
pub fn staging_path(entry: &Path) -> PathBuf {
    entry.with_file_name(format!(
        ".{}.{}",
        entry.file_name().unwrap_or_default().to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// Moves a fully written `staged` entry into place; if another writer got there first, theirs
/// stays (entries of one key are interchangeable) unless `replace`.
pub fn publish(staged: &Path, entry: &Path, replace: bool) -> std::io::Result<()> {
    if replace && entry.is_dir() {
        // Directories cannot be renamed over a non-empty one: move the old one aside first.
        let old = staging_path(entry);
        if std::fs::rename(entry, &old).is_ok() {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    match std::fs::rename(staged, entry) {
        Ok(()) => Ok(()),
        Err(_) if entry.exists() && !replace => {
            if staged.is_dir() {
                std::fs::remove_dir_all(staged)
            } else {
                std::fs::remove_file(staged)
            }
        }
        Err(error) => Err(error),
    }
}

/// Runs blocking cache I/O off the async threads; a task that panicked is an I/O error too.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| Err(std::io::Error::other(error)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_entry(cache: &Cache, kind: &str, name: &str, bytes: usize, age_s: u64) {
        let directory = cache.kind_dir(kind).unwrap().join(name);
        std::fs::create_dir_all(&directory).unwrap();
        std::fs::write(directory.join("data"), vec![b'x'; bytes]).unwrap();
        drop(cache.hold(kind, name).unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(lock_path(&directory))
            .unwrap()
            .set_modified(SystemTime::now() - std::time::Duration::from_secs(age_s))
            .unwrap();
    }

    #[test]
    fn eviction_removes_the_least_recently_used_first_and_spares_held_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_owned(), 2500);
        write_entry(&cache, "parse", "oldest", 1000, 300);
        write_entry(&cache, "deps", "old-but-held", 1000, 200);
        write_entry(&cache, "state", "older", 1000, 100);
        write_entry(&cache, "git", "new.git", 1000, 0);
        let held = cache.hold("deps", "old-but-held").unwrap();
        // hold() marks it used; make it old again to prove the hold is what spares it.
        write_entry(&cache, "deps", "old-but-held", 1000, 200);

        let evicted = cache.evict();
        assert_eq!(evicted.removed, vec!["parse/oldest", "state/older"]);
        assert_eq!(evicted.busy, 1);
        assert_eq!(evicted.total_bytes, 2000);
        assert!(dir.path().join("deps/old-but-held").is_dir());
        assert!(dir.path().join("git/new.git").is_dir());
        assert!(!dir.path().join("parse/oldest.lock").exists());

        drop(held);
        // Under the limit now: nothing more goes.
        assert!(cache.evict().removed.is_empty());
    }

    #[test]
    fn using_an_entry_makes_it_recent() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_owned(), 1500);
        write_entry(&cache, "parse", "a", 1000, 300);
        write_entry(&cache, "parse", "b", 1000, 100);
        drop(cache.hold("parse", "a").unwrap());
        assert_eq!(cache.evict().removed, vec!["parse/b"]);
    }

    #[test]
    fn trees_copy_with_their_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::create_dir_all(source.join("pkg/macros")).unwrap();
        std::fs::write(
            source.join("pkg/macros/m.sql"),
            "{% macro m() %}{% endmacro %}",
        )
        .unwrap();
        std::os::unix::fs::symlink("../vendor/local", source.join("local")).unwrap();
        let copy = dir.path().join("copy");
        copy_tree(&source, &copy).unwrap();
        assert_eq!(
            std::fs::read_to_string(copy.join("pkg/macros/m.sql")).unwrap(),
            "{% macro m() %}{% endmacro %}"
        );
        assert_eq!(
            std::fs::read_link(copy.join("local")).unwrap(),
            Path::new("../vendor/local")
        );
    }
}
