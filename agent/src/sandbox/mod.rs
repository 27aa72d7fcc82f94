//! The sandbox every dbt invocation runs in. This module decides, in the agent, what each build
//! gets; `exec` applies it in the processes between the agent and dbt; `cgroup` holds the
//! limits and kills the tree.
//!
//! A build gets: its own session and process group; a PID namespace (its init's death kills
//! every process in it); a cgroup with memory and pids limits (v2, or v1 where that is what
//! the machine has); rlimits (open files, processes, no core dumps); when the agent is root, a
//! dedicated unprivileged user; landlock rules that allow writes only in the run directory and
//! the build's own database directory, and reads only of the system, dbt's virtualenv and the
//! build's inputs, never of the agent's configuration or secret files. What could not be
//! applied is a warning, or, with `sandbox.required`, the reason the build does not start.

pub mod cgroup;
pub mod exec;

use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use slimci_proto::SandboxReport;

use crate::config::Config;
pub use exec::{Applied, BuildUser, LandlockSpec, Message, Spec};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "sandbox.user `{0}` does not exist; create it (useradd --system --no-create-home {0}) or set sandbox.user to another unprivileged user"
    )]
    NoSuchUser(String),
    #[error("sandbox.user `{0}` is root; dbt must not run as root")]
    RootUser(String),
    #[error("cannot look up sandbox.user `{name}`: {source}")]
    UserLookup { name: String, source: nix::Error },
    #[error(
        "the build user {user} cannot reach {path}: {blocker} is mode {mode:o}; make it searchable by that user (chmod o+x) or move it"
    )]
    Unreachable {
        user: String,
        path: PathBuf,
        blocker: PathBuf,
        mode: u32,
    },
    #[error("cannot inspect {path}: {source}")]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox.required is set, but {0}")]
    Required(String),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("cannot hand {path} to the build user: {source}")]
    Chown {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Paths one build may use besides the system and dbt's virtualenv.
#[derive(Debug, Clone, Default)]
pub struct BuildPaths {
    /// Read and write: the run directory, the build's own database directory.
    pub write: Vec<PathBuf>,
    /// Read only: production's database, the production manifest.
    pub read: Vec<PathBuf>,
}

/// What the agent decided at start-up; `prepare` makes one build's spec from it.
#[derive(Debug)]
pub struct Sandbox {
    required: bool,
    memory_limit: u64,
    pids_limit: u64,
    nofile: u64,
    nproc: Option<u64>,
    mode: cgroup::Mode,
    user: Option<BuildUser>,
    /// Readable by every build: system directories and dbt's installation.
    system_read: Vec<PathBuf>,
    /// Never readable: the agent's configuration directory and secret files.
    denied: Vec<PathBuf>,
    /// What is missing on this machine, said once at start-up and in every build's report.
    pub warnings: Vec<String>,
}

/// System directories dbt reads (those that exist). `/etc` is added without the agent's files.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc",
    "/proc",
    "/sys",
    "/run/systemd/resolve",
];

/// Devices: DAC decides (only /dev/null, /dev/shm, ... are writable by others); dbt's
/// multiprocessing locks need /dev/shm.
const SYSTEM_WRITE: &[&str] = &["/dev"];

impl Sandbox {
    /// Detects what this machine offers and checks the build user can reach what it needs.
    pub fn new(config: &Config, config_path: &Path) -> Result<Sandbox, SandboxError> {
        let settings = &config.sandbox;
        let mut warnings = Vec::new();
        let mode = cgroup::detect(&mut warnings);
        cgroup::remove_stale(&mode);
        let user = if Uid::effective().is_root() {
            let found = nix::unistd::User::from_name(&settings.user).map_err(|source| {
                SandboxError::UserLookup {
                    name: settings.user.clone(),
                    source,
                }
            })?;
            let found = found.ok_or_else(|| SandboxError::NoSuchUser(settings.user.clone()))?;
            if found.uid.is_root() {
                return Err(SandboxError::RootUser(settings.user.clone()));
            }
            Some(BuildUser {
                name: found.name,
                uid: found.uid.as_raw(),
                gid: found.gid.as_raw(),
            })
        } else {
            warnings.push(format!(
                "the agent is not root: dbt runs as the agent's own user ({}), not sandbox.user",
                Uid::current()
            ));
            None
        };
        // The rlimit counts every process of the user, machine-wide: with a dedicated user, all
        // slots' builds together (and other agents' on the same machine). It is the limit
        // where no cgroup limits pids, and a generous backstop where one does. Without a
        // dedicated user it would count the agent's own threads too, so none is set.
        let per_slot = if mode.limits_memory_and_pids() {
            settings.pids_limit.saturating_mul(8)
        } else {
            settings.pids_limit
        };
        let nproc = user
            .as_ref()
            .map(|_| per_slot.saturating_mul(u64::from(config.slots)));

        let mut denied: Vec<PathBuf> = config.protected_files();
        let config_path = std::path::absolute(config_path).unwrap_or(config_path.to_owned());
        let work_dir = std::path::absolute(&config.work_dir).unwrap_or(config.work_dir.clone());
        let root = config
            .warehouse
            .duckdb_root()
            .map(|root| std::path::absolute(root).unwrap_or(root.to_owned()));
        if let Some(dir) = config_path.parent() {
            if work_dir.starts_with(dir) || root.as_ref().is_some_and(|root| root.starts_with(dir))
            {
                warnings.push(format!(
                    "the configuration directory {} also holds the work directory or the warehouse; only the configuration file itself is hidden from dbt (keep the configuration in a directory of its own, such as /etc/slimci)",
                    dir.display()
                ));
            } else {
                denied.push(dir.to_owned());
            }
        }
        denied.push(config_path);
        let denied: Vec<PathBuf> = denied
            .into_iter()
            .flat_map(|path| {
                let canonical = path.canonicalize().ok();
                std::iter::once(path).chain(canonical)
            })
            .collect();

        let mut system_read: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
        system_read.extend(dbt_installation(&config.dbt));
        if let Some(user) = &user {
            check_reachable(user, &config.dbt, true)?;
            // A virtualenv's python links to the interpreter it was made from.
            if let Some(python) = config.dbt.parent().map(|bin| bin.join("python"))
                && let Ok(real) = python.canonicalize()
            {
                check_reachable(user, &real, true)?;
            }
            check_reachable(user, &config.work_dir, false)?;
            if let Some(root) = config.warehouse.duckdb_root() {
                check_reachable(user, root, false)?;
            }
        }
        Ok(Sandbox {
            required: settings.required,
            memory_limit: settings.memory_limit,
            pids_limit: settings.pids_limit,
            nofile: settings.nofile,
            nproc,
            mode,
            user,
            system_read,
            denied,
            warnings,
        })
    }

    pub fn cgroup_version(&self) -> &'static str {
        self.mode.name()
    }

    pub fn user(&self) -> Option<&BuildUser> {
        self.user.as_ref()
    }

    /// Gives `path` and everything beneath it to the build user (a no-op without one).
    pub fn hand_over(&self, path: &Path) -> Result<(), SandboxError> {
        match &self.user {
            Some(user) => chown_tree(path, user.uid, user.gid),
            None => Ok(()),
        }
    }

    /// Takes `path` back from the build user, so later builds can read but not change it.
    pub fn take_back(&self, path: &Path) -> Result<(), SandboxError> {
        match &self.user {
            Some(_) => chown_tree(path, Uid::effective().as_raw(), Gid::effective().as_raw()),
            None => Ok(()),
        }
    }

    /// One build's spec and cgroup. `name` must be unique among running builds.
    /// The landlock rules of a build that may use `paths`: the system and dbt's installation
    /// to read, /dev to write, minus the agent's own files.
    pub fn landlock_rules(&self, paths: &BuildPaths) -> LandlockSpec {
        let mut read: Vec<PathBuf> = self.system_read.clone();
        read.extend(paths.read.iter().cloned());
        let mut write: Vec<PathBuf> = SYSTEM_WRITE.iter().map(PathBuf::from).collect();
        write.extend(paths.write.iter().cloned());
        LandlockSpec {
            read: allow_except(&read, &self.denied),
            write: allow_except(&write, &self.denied),
        }
    }

    pub fn prepare(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        cwd: &Path,
        env: &[(String, String)],
        paths: &BuildPaths,
    ) -> Result<Prepared, SandboxError> {
        if self.required {
            if !self.mode.limits_memory_and_pids() {
                return Err(SandboxError::Required(format!(
                    "this machine gives builds no cgroup memory and pids limits (cgroup {}): {}",
                    self.mode.name(),
                    self.warnings.join("; ")
                )));
            }
            if self.user.is_none() {
                return Err(SandboxError::Required(
                    "the agent is not root, so dbt cannot run as a separate user".to_owned(),
                ));
            }
        }
        let cgroup =
            cgroup::BuildCgroup::create(&self.mode, name, self.memory_limit, self.pids_limit)?;
        let spec = Spec {
            program: program.to_owned(),
            args: args.to_vec(),
            cwd: cwd.to_owned(),
            env: env.to_vec(),
            required: self.required,
            agent_pid: std::process::id() as i32,
            cgroup_procs: cgroup
                .as_ref()
                .map(cgroup::BuildCgroup::procs_files)
                .unwrap_or_default(),
            user: self.user.clone(),
            nofile: self.nofile,
            nproc: self.nproc,
            landlock: Some(self.landlock_rules(paths)),
            wrapper_pid: None,
            applied: Applied::default(),
        };
        Ok(Prepared {
            spec,
            cgroup_version: cgroup.as_ref().map_or("none", cgroup::BuildCgroup::version),
            cgroup,
            startup_warnings: self.warnings.clone(),
        })
    }
}

/// One build, ready to start.
#[derive(Debug)]
pub struct Prepared {
    pub spec: Spec,
    pub cgroup: Option<cgroup::BuildCgroup>,
    pub cgroup_version: &'static str,
    startup_warnings: Vec<String>,
}

impl Prepared {
    /// The run's record of its protections, from the agent's part and what the stages applied.
    pub fn report(&self, applied: &Applied) -> SandboxReport {
        let mut warnings = self.startup_warnings.clone();
        warnings.extend(applied.warnings.iter().cloned());
        let joined = applied.cgroup_joined;
        SandboxReport {
            pid_namespace: applied.pid_namespace,
            cgroup: if joined { self.cgroup_version } else { "none" }.to_owned(),
            memory_limit_bytes: self
                .cgroup
                .as_ref()
                .and_then(|c| c.memory_limit)
                .filter(|_| joined),
            pids_limit: self
                .cgroup
                .as_ref()
                .and_then(|c| c.pids_limit)
                .filter(|_| joined),
            landlock: applied.landlock.clone(),
            landlock_abi: applied.landlock_abi,
            user: applied.user.clone(),
            uid: applied.uid,
            rlimit_nofile: applied.nofile,
            rlimit_nproc: applied.nproc,
            core_dumps: applied.core_dumps,
            warnings,
            prestarted: false,
        }
    }
}

/// dbt's virtualenv and the Python installation it was made from.
fn dbt_installation(dbt: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for path in [Some(dbt.to_owned()), dbt.canonicalize().ok()]
        .into_iter()
        .flatten()
    {
        // <venv>/bin/dbt → <venv>
        if let Some(venv) = path.parent().and_then(Path::parent) {
            paths.push(venv.to_owned());
            if let Ok(config) = std::fs::read_to_string(venv.join("pyvenv.cfg")) {
                for line in config.lines() {
                    if let Some((key, value)) = line.split_once('=')
                        && key.trim() == "home"
                        && let Some(prefix) = Path::new(value.trim()).parent()
                    {
                        paths.push(prefix.to_owned());
                    }
                }
            }
        }
    }
    // The interpreter the venv links to, wherever it lives.
    if let Some(python) = dbt.parent().map(|bin| bin.join("python"))
        && let Ok(real) = python.canonicalize()
        && let Some(prefix) = real.parent().and_then(Path::parent)
    {
        paths.push(prefix.to_owned());
    }
    paths.sort();
    paths.dedup();
    paths
}

/// `roots`, except that a root containing a denied path is replaced by its other children, as
/// deep as needed (landlock can only allow, so a denied file inside an allowed directory must
/// be carved out this way). Paths that do not exist are dropped.
pub fn allow_except(roots: &[PathBuf], denied: &[PathBuf]) -> Vec<PathBuf> {
    let mut allowed = Vec::new();
    for root in roots {
        carve(root, denied, &mut allowed, 0);
    }
    allowed.sort();
    allowed.dedup();
    allowed
}

fn carve(root: &Path, denied: &[PathBuf], allowed: &mut Vec<PathBuf>, depth: usize) {
    if denied.iter().any(|denied| root.starts_with(denied)) {
        return;
    }
    if !denied.iter().any(|denied| denied.starts_with(root)) {
        if root.exists() {
            allowed.push(root.to_owned());
        }
        return;
    }
    if depth > 32 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        carve(&entry.path(), denied, allowed, depth + 1);
    }
}

/// Checks, from the mode bits, that `user` can traverse to `path` (and execute it, for a
/// file), so a misconfiguration fails at start-up with a message rather than in every build.
fn check_reachable(user: &BuildUser, path: &Path, executable: bool) -> Result<(), SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let path = std::path::absolute(path).unwrap_or(path.to_owned());
    let allows = |meta: &std::fs::Metadata, bits: u32| {
        let mode = meta.mode();
        let granted = if meta.uid() == user.uid {
            (mode >> 6) & 7
        } else if meta.gid() == user.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        granted & bits == bits
    };
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        let Ok(meta) = std::fs::metadata(dir) else {
            // Not created yet: the agent creates it.
            return Ok(());
        };
        if !allows(&meta, 1) {
            return Err(SandboxError::Unreachable {
                user: user.name.clone(),
                path: path.clone(),
                blocker: dir.to_owned(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    if executable {
        let meta = std::fs::metadata(&path).map_err(|source| SandboxError::Inspect {
            path: path.clone(),
            source,
        })?;
        if !allows(&meta, 5) {
            return Err(SandboxError::Unreachable {
                user: user.name.clone(),
                path: path.clone(),
                blocker: path.clone(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let fail = |source| SandboxError::Chown {
        path: path.to_owned(),
        source,
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(fail)?;
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(fail)? {
            chown_tree(&entry.map_err(fail)?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_paths_are_carved_out_of_allowed_directories() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        for sub in ["slimci", "ssl/certs", "other"] {
            std::fs::create_dir_all(etc.join(sub)).unwrap();
        }
        std::fs::write(etc.join("passwd"), "").unwrap();
        std::fs::write(etc.join("ssl/secret.key"), "").unwrap();
        let allowed = allow_except(
            &[etc.clone(), dir.path().join("missing")],
            &[etc.join("slimci"), etc.join("ssl/secret.key")],
        );
        assert_eq!(
            allowed,
            [etc.join("other"), etc.join("passwd"), etc.join("ssl/certs")]
        );
        let only_etc = std::slice::from_ref(&etc);
        assert!(allow_except(only_etc, only_etc).is_empty());
        assert_eq!(allow_except(only_etc, &[]), only_etc);
    }

    fn sandbox(required: bool, mode: cgroup::Mode, user: Option<BuildUser>) -> Sandbox {
        Sandbox {
            required,
            memory_limit: 1 << 30,
            pids_limit: 100,
            nofile: 1024,
            nproc: None,
            mode,
            user,
            system_read: vec![PathBuf::from("/usr")],
            denied: vec![PathBuf::from("/etc/slimci")],
            warnings: vec!["no writable cgroup".to_owned()],
        }
    }

    #[test]
    fn a_required_sandbox_refuses_to_build_without_limits_or_a_build_user() {
        let user = BuildUser {
            name: "slimci-build".into(),
            uid: 999,
            gid: 999,
        };
        let prepare = |sandbox: &Sandbox| {
            sandbox.prepare(
                "x",
                Path::new("/usr/bin/dbt"),
                &[],
                Path::new("/tmp"),
                &[],
                &BuildPaths::default(),
            )
        };
        let error = prepare(&sandbox(true, cgroup::Mode::None, Some(user.clone()))).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("sandbox.required is set, but this machine gives builds no cgroup memory and pids limits (cgroup none): no writable cgroup"),
            "{error}"
        );
        let limits_only_for_kill = cgroup::Mode::V2 {
            parent: PathBuf::from("/nonexistent"),
            limits: false,
        };
        assert!(prepare(&sandbox(true, limits_only_for_kill, Some(user))).is_err());

        // Not required: the build gets what there is, and the report says so.
        let prepared = prepare(&sandbox(false, cgroup::Mode::None, None)).unwrap();
        assert!(prepared.spec.cgroup_procs.is_empty());
        assert_eq!(prepared.spec.user, None);
        let report = prepared.report(&Applied {
            landlock: "none".into(),
            warnings: vec!["landlock is not available".into()],
            ..Applied::default()
        });
        assert_eq!(report.cgroup, "none");
        assert_eq!(report.memory_limit_bytes, None);
        assert_eq!(
            report.warnings,
            ["no writable cgroup", "landlock is not available"]
        );
        assert!(
            prepared
                .spec
                .landlock
                .unwrap()
                .read
                .contains(&PathBuf::from("/usr")),
            "system paths are readable"
        );
    }

    #[test]
    fn unreachable_paths_name_the_blocking_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        std::fs::create_dir_all(closed.join("inner")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let user = BuildUser {
            name: "nobody-here".into(),
            uid: 65_000,
            gid: 65_000,
        };
        let error = check_reachable(&user, &closed.join("inner/work"), false).unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("{} is mode 700", closed.display())),
            "{error}"
        );
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        check_reachable(&user, &closed.join("inner/work"), false).unwrap();
    }
}
