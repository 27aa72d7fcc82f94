//! A persistent bare cache per repository, and checkouts of exact commits out of it.
//!
//! The cache fetches only what it lacks: nothing when the commit is already there, otherwise the
//! job's ref (`refs/pull/N/head`, `refs/heads/main`), then the commit itself. A checkout writes
//! the commit's tree as plain files into a fresh directory: no `.git`, no link back to the
//! cache, so the cache can be fetched into or evicted while a build runs.
//!
//! All of this is blocking (libgit2); callers run it on the blocking pool.

use std::path::{Path, PathBuf};

use git2::{Cred, FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository};
use slimci_proto::{GitTarget, RepoName, Sha};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("git cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "commit {sha} is not in {url}: it is neither reachable from `{fetch_ref}` nor fetchable by id"
    )]
    CommitNotFound {
        sha: String,
        url: String,
        fetch_ref: String,
    },
    #[error("could not fetch `{fetch_ref}` from {url}: {source}")]
    Fetch {
        fetch_ref: String,
        url: String,
        source: git2::Error,
    },
    #[error("the repository holds an entry git cannot name safely: {0:?}")]
    UnsafePath(String),
}

pub struct GitCache {
    root: PathBuf,
    https_token: Option<String>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> GitError + '_ {
    move |source| GitError::Io {
        path: path.to_owned(),
        source,
    }
}

impl GitCache {
    pub fn new(root: PathBuf, https_token: Option<String>) -> GitCache {
        GitCache { root, https_token }
    }

    fn bare_path(&self, repository: &RepoName) -> PathBuf {
        self.root.join(format!("{}.git", repository.slug()))
    }

    fn fetch_options(&self) -> FetchOptions<'_> {
        let mut callbacks = RemoteCallbacks::new();
        if let Some(token) = &self.https_token {
            callbacks.credentials(move |_url, _user, _allowed| {
                Cred::userpass_plaintext("x-access-token", token)
            });
        }
        let mut options = FetchOptions::new();
        options.remote_callbacks(callbacks);
        options
    }

    /// Makes sure the target commit is in the cache and returns its SHA, and whether anything
    /// had to be fetched. Holds an exclusive lock on the repository's cache meanwhile.
    pub fn prepare(
        &self,
        repository: &RepoName,
        clone_url: &str,
        target: &GitTarget,
    ) -> Result<(Sha, bool), GitError> {
        std::fs::create_dir_all(&self.root).map_err(io_error(&self.root))?;
        let bare = self.bare_path(repository);
        // Exclusive: agents on one VM may share the cache, and eviction must wait too.
        let _lock = crate::cache::Cache::hold_exclusive(&bare).map_err(io_error(&bare))?;
        let repo = match Repository::open_bare(&bare) {
            Ok(repo) => repo,
            Err(_) => Repository::init_bare(&bare)?,
        };
        if let Some(sha) = &target.sha
            && repo.find_commit(Oid::from_str(sha.as_str())?).is_ok()
        {
            tracing::debug!(%sha, "commit already cached; no fetch");
            return Ok((sha.clone(), false));
        }
        let local_ref = format!(
            "refs/slimci/{}",
            target.fetch_ref.trim_start_matches("refs/")
        );
        let mut remote = repo.remote_anonymous(clone_url)?;
        let fetched = remote.fetch(
            &[format!("+{}:{local_ref}", target.fetch_ref)],
            Some(&mut self.fetch_options()),
            None,
        );
        match (&target.sha, fetched) {
            (None, Err(source)) => Err(GitError::Fetch {
                fetch_ref: target.fetch_ref.clone(),
                url: clone_url.to_owned(),
                source,
            }),
            (None, Ok(())) => {
                let oid = repo.refname_to_id(&local_ref)?;
                Ok((
                    Sha::parse(&oid.to_string()).expect("git object ids are hex"),
                    true,
                ))
            }
            (Some(sha), result) => {
                if let Err(error) = result {
                    tracing::info!(%error, fetch_ref = %target.fetch_ref, "ref fetch failed; trying the commit id");
                }
                let oid = Oid::from_str(sha.as_str())?;
                if repo.find_commit(oid).is_ok() {
                    return Ok((sha.clone(), true));
                }
                let by_id = remote.fetch(
                    &[format!("+{sha}:refs/slimci/commits/{sha}")],
                    Some(&mut self.fetch_options()),
                    None,
                );
                if by_id.is_ok() && repo.find_commit(oid).is_ok() {
                    return Ok((sha.clone(), true));
                }
                Err(GitError::CommitNotFound {
                    sha: sha.to_string(),
                    url: clone_url.to_owned(),
                    fetch_ref: target.fetch_ref.clone(),
                })
            }
        }
    }

    /// Writes the tree of `sha` into `destination` (which must not exist yet).
    pub fn checkout(
        &self,
        repository: &RepoName,
        sha: &Sha,
        destination: &Path,
    ) -> Result<usize, GitError> {
        let repo = Repository::open_bare(self.bare_path(repository))?;
        let commit = repo.find_commit(Oid::from_str(sha.as_str())?)?;
        std::fs::create_dir_all(destination).map_err(io_error(destination))?;
        write_tree(&repo, &commit.tree()?, destination)
    }
}

fn write_tree(
    repo: &Repository,
    tree: &git2::Tree<'_>,
    directory: &Path,
) -> Result<usize, GitError> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = 0;
    for entry in tree.iter() {
        let name = entry.name().ok_or_else(|| {
            GitError::UnsafePath(String::from_utf8_lossy(entry.name_bytes()).into_owned())
        })?;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name == ".git" {
            return Err(GitError::UnsafePath(name.to_owned()));
        }
        let path = directory.join(name);
        match entry.kind() {
            Some(ObjectType::Tree) => {
                std::fs::create_dir(&path).map_err(io_error(&path))?;
                let subtree = repo.find_tree(entry.id())?;
                files += write_tree(repo, &subtree, &path)?;
            }
            Some(ObjectType::Blob) => {
                let blob = repo.find_blob(entry.id())?;
                if entry.filemode() == 0o120000 {
                    let target = String::from_utf8_lossy(blob.content()).into_owned();
                    std::os::unix::fs::symlink(&target, &path).map_err(io_error(&path))?;
                } else {
                    std::fs::write(&path, blob.content()).map_err(io_error(&path))?;
                    if entry.filemode() == 0o100755 {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                            .map_err(io_error(&path))?;
                    }
                }
                files += 1;
            }
            // Submodules (commits) are not checked out; dbt projects do not use them.
            _ => {}
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let output = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    fn origin() -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "-b", "main"]);
        std::fs::create_dir(dir.path().join("models")).unwrap();
        std::fs::write(dir.path().join("models/a.sql"), "select 1").unwrap();
        git(dir.path(), &["add", "."]);
        git(dir.path(), &["commit", "-qm", "one"]);
        let main_sha = git(dir.path(), &["rev-parse", "HEAD"]);
        git(dir.path(), &["checkout", "-qb", "feature"]);
        std::fs::write(dir.path().join("models/a.sql"), "select 2").unwrap();
        git(dir.path(), &["commit", "-qam", "two"]);
        let pr_sha = git(dir.path(), &["rev-parse", "HEAD"]);
        git(dir.path(), &["update-ref", "refs/pull/3/head", &pr_sha]);
        git(dir.path(), &["checkout", "-q", "main"]);
        git(dir.path(), &["branch", "-D", "feature"]);
        (dir, main_sha, pr_sha)
    }

    #[test]
    fn fetches_a_pr_ref_and_checks_out_plain_files() {
        let (origin, _, pr_sha) = origin();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = GitCache::new(cache_dir.path().to_owned(), None);
        let repo = RepoName::parse("shop").unwrap();
        let target = GitTarget {
            sha: Some(Sha::parse(&pr_sha).unwrap()),
            fetch_ref: "refs/pull/3/head".into(),
        };
        let (sha, fetched) = cache
            .prepare(&repo, origin.path().to_str().unwrap(), &target)
            .unwrap();
        assert!(fetched);
        let checkout = tempfile::tempdir().unwrap();
        let destination = checkout.path().join("src");
        assert_eq!(cache.checkout(&repo, &sha, &destination).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(destination.join("models/a.sql")).unwrap(),
            "select 2"
        );
        assert!(!destination.join(".git").exists());
        // Once cached, the origin is not needed any more.
        drop(origin);
        assert_eq!(
            cache.prepare(&repo, "/nonexistent", &target).unwrap(),
            (sha, false)
        );
    }

    #[test]
    fn a_branch_resolves_to_its_head() {
        let (origin, main_sha, _) = origin();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = GitCache::new(cache_dir.path().to_owned(), None);
        let repo = RepoName::parse("shop").unwrap();
        let target = GitTarget {
            sha: None,
            fetch_ref: "refs/heads/main".into(),
        };
        let (sha, _) = cache
            .prepare(&repo, origin.path().to_str().unwrap(), &target)
            .unwrap();
        assert_eq!(sha.as_str(), main_sha);
    }

    #[test]
    fn an_unknown_commit_is_a_clear_error() {
        let (origin, _, _) = origin();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = GitCache::new(cache_dir.path().to_owned(), None);
        let repo = RepoName::parse("shop").unwrap();
        let target = GitTarget {
            sha: Some(Sha::parse(&"e".repeat(40)).unwrap()),
            fetch_ref: "refs/pull/9/head".into(),
        };
        let error = cache
            .prepare(&repo, origin.path().to_str().unwrap(), &target)
            .unwrap_err();
        assert!(matches!(error, GitError::CommitNotFound { .. }), "{error}");
    }
}
