//! Control groups for build process trees: where the agent's own cgroups are (parsed from
//! `/proc/self/cgroup` and `/proc/self/mountinfo`), which version to use, and per-build cgroups
//! with memory and pids limits that can be killed as a whole.
//!
//! - **v2** (one unified hierarchy): used when the agent's cgroup offers the `memory` and `pids`
//!   controllers. Builds get `memory.max` (with `memory.swap.max = 0` and `memory.oom.group`),
//!   `pids.max`, and die through `cgroup.kill`. A writable v2 cgroup without those controllers
//!   still gives `cgroup.kill` (reported as v2 without limits).
//! - **v1** (a hierarchy per controller): `memory.limit_in_bytes` (and `memsw` where swap
//!   accounting exists), `pids.max`, and the freezer to kill a tree that keeps forking.
//! - **none**: nothing writable; the PID namespace and the process group remain.
//!
//! Build cgroups are created beside the agent as `<agent's cgroup>/slimci-<name>`, by the agent
//! (so they belong to it, not to the build user), and removed when the build has ended.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Prefix of every build cgroup's directory name.
pub const PREFIX: &str = "slimci-";

/// A line of `/proc/self/mountinfo` that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// The path inside the hierarchy that is mounted (not `/` inside containers).
    pub root: String,
    pub mount_point: PathBuf,
    /// `cgroup2`, or `cgroup` for v1.
    pub fstype: String,
    /// v1: the controllers of this hierarchy (`memory`, `pids`, `freezer`, `name=systemd`, ...).
    pub controllers: Vec<String>,
}

/// Cgroup mounts listed in mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let _source = after.next()?;
            let super_options = after.next().unwrap_or_default();
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let root = unescape_mount_path(fields.get(3)?);
            let mount_point = PathBuf::from(unescape_mount_path(fields.get(4)?));
            let controllers = if fstype == "cgroup" {
                super_options
                    .split(',')
                    .filter(|option| !matches!(*option, "rw" | "ro") && !option.contains("xattr"))
                    .map(str::to_owned)
                    .collect()
            } else {
                Vec::new()
            };
            Some(CgroupMount {
                root,
                mount_point,
                fstype: fstype.to_owned(),
                controllers,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'\\'
            && at + 3 < bytes.len()
            && bytes[at + 1..at + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let digit = |i: usize| u32::from(bytes[at + i] - b'0');
            out.push((digit(1) * 64 + digit(2) * 8 + digit(3)) as u8);
            at += 4;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub hierarchy: u32,
    /// Empty for the v2 hierarchy.
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?.to_owned();
            Some(Membership {
                hierarchy,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path,
            })
        })
        .collect()
}

/// Where the agent's own cgroups are, as directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    /// The agent's v2 cgroup directory, if a v2 hierarchy is mounted.
    pub v2: Option<PathBuf>,
    /// The agent's v1 cgroup directory per controller (`memory`, `pids`, `freezer`).
    pub v1: BTreeMap<String, PathBuf>,
}

fn own_directory(mount: &CgroupMount, path: &str) -> PathBuf {
    // Inside a container the mount's root is the container's cgroup and paths are relative
    // to the host's hierarchy; strip the part the mount hides.
    let relative = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str()).unwrap_or("")
    };
    mount.mount_point.join(relative.trim_start_matches('/'))
}

/// Combines mountinfo and `/proc/self/cgroup` into the agent's cgroup directories.
pub fn locate(mountinfo: &str, proc_cgroup: &str) -> Located {
    let mounts = parse_mountinfo(mountinfo);
    let memberships = parse_proc_cgroup(proc_cgroup);
    let mut located = Located::default();
    for membership in &memberships {
        if membership.hierarchy == 0 && membership.controllers.is_empty() {
            if let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup2") {
                located.v2 = Some(own_directory(mount, &membership.path));
            }
            continue;
        }
        for controller in ["memory", "pids", "freezer"] {
            if !membership.controllers.iter().any(|c| c == controller) {
                continue;
            }
            if let Some(mount) = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.controllers.iter().any(|c| c == controller))
            {
                located.v1.insert(
                    controller.to_owned(),
                    own_directory(mount, &membership.path),
                );
            }
        }
    }
    located
}

/// Which cgroup version the agent uses and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    V2 {
        /// Build cgroups are created here.
        parent: PathBuf,
        /// `memory` and `pids` are enabled for the build cgroups.
        limits: bool,
    },
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        freezer: Option<PathBuf>,
    },
    None,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::V2 { .. } => "v2",
            Mode::V1 { .. } => "v1",
            Mode::None => "none",
        }
    }

    /// Whether builds get both a memory and a pids limit.
    pub fn limits_memory_and_pids(&self) -> bool {
        match self {
            Mode::V2 { limits, .. } => *limits,
            Mode::V1 { memory, pids, .. } => memory.is_some() && pids.is_some(),
            Mode::None => false,
        }
    }
}

fn read_trimmed(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path).map(|text| text.trim().to_owned())
}

/// Whether the agent can create cgroups in `dir` (it tries, and removes the probe).
fn can_create_in(dir: &Path) -> bool {
    let probe = dir.join(format!("{PREFIX}probe-{}", std::process::id()));
    match std::fs::create_dir(&probe) {
        Ok(()) => {
            let _ = std::fs::remove_dir(&probe);
            true
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_dir(&probe);
            true
        }
        Err(_) => false,
    }
}

/// In v2, controllers reach child cgroups only through `cgroup.subtree_control`, and a cgroup
/// with processes of its own (other than the root) cannot enable it. So the agent moves itself
/// into a leaf `slimci-agent` first (as a delegated systemd service expects).
fn enable_v2_controllers(own: &Path, warnings: &mut Vec<String>) -> bool {
    let wanted = ["memory", "pids"];
    let available = read_trimmed(&own.join("cgroup.controllers")).unwrap_or_default();
    if !wanted
        .iter()
        .all(|c| available.split_whitespace().any(|a| a == *c))
    {
        return false;
    }
    let enabled = |own: &Path| {
        let text = read_trimmed(&own.join("cgroup.subtree_control")).unwrap_or_default();
        wanted
            .iter()
            .all(|c| text.split_whitespace().any(|a| a == *c))
    };
    if enabled(own) {
        return true;
    }
    let control = own.join("cgroup.subtree_control");
    if std::fs::write(&control, "+memory +pids").is_ok() {
        return true;
    }
    let leaf = own.join(format!("{PREFIX}agent"));
    let moved = std::fs::create_dir_all(&leaf)
        .and_then(|()| std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()));
    if let Err(error) = moved {
        warnings.push(format!(
            "cannot move the agent into {} to enable cgroup controllers: {error}",
            leaf.display()
        ));
        return false;
    }
    match std::fs::write(&control, "+memory +pids") {
        Ok(()) => true,
        Err(error) => {
            warnings.push(format!(
                "cannot enable the memory and pids controllers in {}: {error} (other processes share the agent's cgroup?)",
                control.display()
            ));
            false
        }
    }
}

/// Picks the cgroup version and checks it is writable; says why not in `warnings`.
pub fn choose(located: &Located, warnings: &mut Vec<String>) -> Mode {
    if let Some(own) = &located.v2
        && can_create_in(own)
    {
        let limits = enable_v2_controllers(own, warnings);
        let v1_has_limits = located.v1.contains_key("memory") || located.v1.contains_key("pids");
        if limits || !v1_has_limits {
            return Mode::V2 {
                parent: own.clone(),
                limits,
            };
        }
    }
    let usable = |controller: &str| {
        located
            .v1
            .get(controller)
            .filter(|dir| can_create_in(dir))
            .cloned()
    };
    let (memory, pids, freezer) = (usable("memory"), usable("pids"), usable("freezer"));
    if memory.is_some() || pids.is_some() || freezer.is_some() {
        for (controller, dir) in [("memory", &memory), ("pids", &pids), ("freezer", &freezer)] {
            if dir.is_none() {
                warnings.push(format!(
                    "cgroup v1 controller `{controller}` is not writable"
                ));
            }
        }
        return Mode::V1 {
            memory,
            pids,
            freezer,
        };
    }
    warnings.push(
        "no writable cgroup (v1 or v2): builds have no memory or pids limit, and only the PID namespace and the process group end them".to_owned(),
    );
    Mode::None
}

/// Detects the machine's cgroups for this process.
pub fn detect(warnings: &mut Vec<String>) -> Mode {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    choose(&locate(&mountinfo, &proc_cgroup), warnings)
}

/// Removes build cgroups an earlier agent left empty (a crash between a build's end and its
/// cleanup). Non-empty ones, and ones made in the last minute (a build of another agent
/// sharing the cgroup may be about to join it), are kept.
pub fn remove_stale(mode: &Mode) {
    let parents: Vec<&PathBuf> = match mode {
        Mode::V2 { parent, .. } => vec![parent],
        Mode::V1 {
            memory,
            pids,
            freezer,
        } => [memory, pids, freezer].into_iter().flatten().collect(),
        Mode::None => Vec::new(),
    };
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let recent = entry
                .metadata()
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_none_or(|age| age < Duration::from_secs(60));
            if name.starts_with(PREFIX) && name != format!("{PREFIX}agent") && !recent {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// One build's cgroup (one directory per v1 hierarchy).
#[derive(Debug)]
pub struct BuildCgroup {
    version: &'static str,
    /// Every directory of this build's cgroup; the first that has `cgroup.procs` lists it.
    dirs: Vec<PathBuf>,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    freezer: Option<PathBuf>,
    /// v2: `cgroup.kill` works.
    v2: bool,
    pub memory_limit: Option<u64>,
    pub pids_limit: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the build's cgroup at {path}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn write(path: PathBuf, value: &str) -> Result<(), CgroupError> {
    std::fs::write(&path, value).map_err(|source| CgroupError { path, source })
}

fn make(dir: PathBuf) -> Result<PathBuf, CgroupError> {
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
        Err(source) => Err(CgroupError { path: dir, source }),
    }
}

/// A counter from a flat-keyed cgroup file (`memory.events`, `pids.events`, `memory.oom_control`).
pub fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(name, _)| *name == key)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

impl BuildCgroup {
    /// Creates `<parent>/slimci-<name>` with the limits, where the mode allows them.
    pub fn create(
        mode: &Mode,
        name: &str,
        memory_limit: u64,
        pids_limit: u64,
    ) -> Result<Option<BuildCgroup>, CgroupError> {
        let leaf = format!("{PREFIX}{name}");
        match mode {
            Mode::None => Ok(None),
            Mode::V2 { parent, limits } => {
                let dir = make(parent.join(&leaf))?;
                let mut cgroup = BuildCgroup {
                    version: "v2",
                    dirs: vec![dir.clone()],
                    memory: None,
                    pids: None,
                    freezer: None,
                    v2: true,
                    memory_limit: None,
                    pids_limit: None,
                };
                if *limits {
                    write(dir.join("memory.max"), &memory_limit.to_string())?;
                    // Swap would let the build exceed its limit unseen; oom.group kills the
                    // whole tree together rather than one process of it.
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                    let _ = std::fs::write(dir.join("memory.oom.group"), "1");
                    write(dir.join("pids.max"), &pids_limit.to_string())?;
                    cgroup.memory = Some(dir.clone());
                    cgroup.pids = Some(dir);
                    cgroup.memory_limit = Some(memory_limit);
                    cgroup.pids_limit = Some(pids_limit);
                }
                Ok(Some(cgroup))
            }
            Mode::V1 {
                memory,
                pids,
                freezer,
            } => {
                let mut cgroup = BuildCgroup {
                    version: "v1",
                    dirs: Vec::new(),
                    memory: None,
                    pids: None,
                    freezer: None,
                    v2: false,
                    memory_limit: None,
                    pids_limit: None,
                };
                if let Some(parent) = pids {
                    let dir = make(parent.join(&leaf))?;
                    cgroup.dirs.push(dir.clone());
                    write(dir.join("pids.max"), &pids_limit.to_string())?;
                    cgroup.pids = Some(dir);
                    cgroup.pids_limit = Some(pids_limit);
                }
                if let Some(parent) = memory {
                    let dir = make(parent.join(&leaf))?;
                    cgroup.dirs.push(dir.clone());
                    write(dir.join("memory.limit_in_bytes"), &memory_limit.to_string())?;
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(memsw, &memory_limit.to_string())?;
                    }
                    cgroup.memory = Some(dir);
                    cgroup.memory_limit = Some(memory_limit);
                }
                if let Some(parent) = freezer {
                    let dir = make(parent.join(&leaf))?;
                    cgroup.dirs.push(dir.clone());
                    cgroup.freezer = Some(dir);
                }
                Ok(Some(cgroup))
            }
        }
    }

    pub fn version(&self) -> &'static str {
        self.version
    }

    /// The `cgroup.procs` files the build's first process writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// Every process in the build's cgroup (the union over v1 hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|line| line.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// How often the kernel's OOM killer killed a process of the build.
    pub fn oom_kills(&self) -> u64 {
        let Some(dir) = &self.memory else { return 0 };
        if self.v2 {
            let events = std::fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
            counter(&events, "oom_kill").max(counter(&events, "oom_group_kill"))
        } else {
            let control =
                std::fs::read_to_string(dir.join("memory.oom_control")).unwrap_or_default();
            counter(&control, "oom_kill")
        }
    }

    /// How often a fork failed because of the pids limit.
    pub fn pids_limit_hits(&self) -> u64 {
        let Some(dir) = &self.pids else { return 0 };
        counter(
            &std::fs::read_to_string(dir.join("pids.events")).unwrap_or_default(),
            "max",
        )
    }

    /// Sends `signal` to every process of the build.
    pub fn signal_all(&self, signal: Signal) {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Kills every process of the build, including ones forking as fast as they can: v2's
    /// `cgroup.kill`; in v1 the freezer stops them before they are killed.
    pub fn kill_all(&self) {
        if self.pids().is_empty() {
            return;
        }
        if self.v2 && std::fs::write(self.dirs[0].join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let frozen = self.freezer.as_ref().is_some_and(|dir| freeze(dir, true));
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if frozen {
                break;
            }
        }
        if let Some(dir) = &self.freezer {
            freeze(dir, false);
        }
    }

    /// Waits until no process is left in the cgroup, killing again while any is.
    pub fn wait_empty(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.pids().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.kill_all();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the cgroup's directories (they must be empty of processes).
    pub fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// v1 freezer: writes the state and waits (briefly) until the kernel reached it.
fn freeze(dir: &Path, frozen: bool) -> bool {
    let state = if frozen { "FROZEN" } else { "THAWED" };
    if std::fs::write(dir.join("freezer.state"), state).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if read_trimmed(&dir.join("freezer.state")).is_ok_and(|now| now == state) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/69ea
1:cpu:/
0::/
";

    #[test]
    fn hybrid_machines_show_both_versions() {
        let located = locate(HYBRID_MOUNTINFO, HYBRID_CGROUP);
        assert_eq!(located.v2, Some(PathBuf::from("/sys/fs/cgroup/unified/")));
        assert_eq!(
            located.v1.get("memory"),
            Some(&PathBuf::from("/sys/fs/cgroup/memory/process_api/69ea"))
        );
        assert_eq!(
            located.v1.get("pids"),
            Some(&PathBuf::from("/sys/fs/cgroup/pids/"))
        );
        assert_eq!(
            located.v1.get("freezer"),
            Some(&PathBuf::from("/sys/fs/cgroup/freezer/"))
        );
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        let systemd = mounts
            .iter()
            .find(|m| m.mount_point.ends_with("systemd"))
            .unwrap();
        assert_eq!(systemd.controllers, ["name=systemd"]);
    }

    #[test]
    fn unified_machines_have_only_v2() {
        let mountinfo = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let located = locate(mountinfo, "0::/system.slice/slimci-agent.service\n");
        assert_eq!(
            located.v2,
            Some(PathBuf::from(
                "/sys/fs/cgroup/system.slice/slimci-agent.service"
            ))
        );
        assert!(located.v1.is_empty());
    }

    #[test]
    fn container_mount_roots_are_stripped() {
        let mountinfo = "700 690 0:26 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        let located = locate(mountinfo, "0::/docker/abc/inner\n");
        assert_eq!(located.v2, Some(PathBuf::from("/sys/fs/cgroup/inner")));
        let located = locate(mountinfo, "0::/\n");
        assert_eq!(located.v2, Some(PathBuf::from("/sys/fs/cgroup/")));
    }

    #[test]
    fn escaped_mount_points_and_garbage() {
        let mountinfo =
            "41 31 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\nnot a mountinfo line\n";
        let mounts = parse_mountinfo(mountinfo);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/with space"));
        assert!(parse_proc_cgroup("garbage\n::\n").is_empty());
        assert_eq!(locate("", ""), Located::default());
    }

    #[test]
    fn counters_are_read_by_key() {
        let events = "low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(counter(events, "oom_kill"), 1);
        assert_eq!(counter(events, "max"), 7);
        assert_eq!(counter(events, "missing"), 0);
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(counter(oom_control, "oom_kill"), 3);
    }
}
