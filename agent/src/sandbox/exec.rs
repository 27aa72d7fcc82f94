//! The processes between the agent and dbt. The agent is multithreaded, so nothing that must
//! happen between fork and exec happens in it: it starts its own binary again, and each stage
//! below runs single-threaded in a process of its own, then execs or spawns the next.
//!
//! ```text
//! agent ──spawn──▶ wrapper (`slimci-agent sandbox-exec`, root if the agent is)
//!                   setsid; parent-death signal, parent check; rlimits; joins the build cgroup;
//!                   unshares a PID namespace; forwards SIGTERM/SIGINT; exits as init does
//!                   └─spawn─▶ init (`slimci-agent sandbox-init`, PID 1 of the namespace)
//!                              parent-death signal, parent check; drops to the build user;
//!                              landlock; reports what it applied; reaps orphans; passes
//!                              termination signals to every process in the namespace
//!                              └─spawn─▶ dbt (and everything it starts)
//! ```
//!
//! When init exits (dbt ended) or dies (the wrapper died, by the agent's kill or with the
//! agent), the kernel kills every process left in the namespace: a daemon that double-forked
//! and called `setsid` included. Without a PID namespace init is a child subreaper and kills the
//! orphans it inherited itself.
//!
//! The stages take their instructions from the `SLIMCI_SANDBOX_SPEC` environment variable
//! (the agent is root or the same user; the build user cannot read it) and talk back over
//! their standard input, a socket to the agent that dbt never gets: first a
//! [`Message::Report`] of what was applied (or why it could not be), last [`Message::Exit`],
//! how dbt ended.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

/// The environment variable that carries the [`Spec`].
pub const SPEC_ENV: &str = "SLIMCI_SANDBOX_SPEC";
/// The subcommand of the wrapper stage.
pub const WRAPPER_ARG: &str = "sandbox-exec";
/// The subcommand of the init stage.
pub const INIT_ARG: &str = "sandbox-init";
/// Exit code of a stage that could not set the sandbox up (the report says why).
pub const SETUP_FAILED: i32 = 125;

/// The unprivileged user dbt runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Landlock rules: everything else is neither readable nor writable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockSpec {
    /// Read and execute beneath these.
    pub read: Vec<PathBuf>,
    /// Read, write, create and remove beneath these.
    pub write: Vec<PathBuf>,
}

/// What the stages apply, as the agent decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// dbt's whole environment.
    pub env: Vec<(String, String)>,
    /// Fail instead of warning when a protection cannot be applied.
    pub required: bool,
    /// The agent's pid: the wrapper checks it is still its parent.
    pub agent_pid: i32,
    /// The `cgroup.procs` files of the build's cgroup.
    pub cgroup_procs: Vec<PathBuf>,
    pub user: Option<BuildUser>,
    pub nofile: u64,
    pub nproc: Option<u64>,
    pub landlock: Option<LandlockSpec>,
    /// Set by the wrapper for init: its own pid, and what it applied so far.
    #[serde(default)]
    pub wrapper_pid: Option<i32>,
    #[serde(default)]
    pub applied: Applied,
}

/// What the stages applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub pid_namespace: bool,
    pub cgroup_joined: bool,
    /// The user dbt runs as, and its uid.
    pub user: String,
    pub uid: u32,
    /// The landlock ABI the kernel offers, when a ruleset was enforced.
    pub landlock_abi: Option<u32>,
    /// `full`, `partial` or `none`.
    pub landlock: String,
    pub nofile: u64,
    pub nproc: Option<u64>,
    pub core_dumps: bool,
    pub warnings: Vec<String>,
    /// Why the build did not start, when it did not.
    pub error: Option<String>,
}

/// What the stages tell the agent, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Report(Applied),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// Writes one message to standard input (the agent's socket). Errors are ignored: without the
/// socket (a stage started by hand) there is nobody to tell.
fn send(message: &Message) {
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return;
    };
    let mut line = serde_json::to_vec(message).expect("messages serialize");
    line.push(b'\n');
    let _ = std::fs::File::from(fd).write_all(&line);
}

fn fail(mut applied: Applied, error: String) -> ! {
    eprintln!("slimci sandbox: {error}");
    applied.error = Some(error);
    send(&Message::Report(applied));
    std::process::exit(SETUP_FAILED)
}

fn read_spec() -> Spec {
    let text = std::env::var(SPEC_ENV).unwrap_or_default();
    match serde_json::from_str(&text) {
        Ok(spec) => spec,
        Err(error) => fail(
            Applied::default(),
            format!("no usable {SPEC_ENV} ({error}); this subcommand is started by the agent"),
        ),
    }
}

/// Signals the stages handle synchronously with `sigwait`, blocked in them. A blocked mask
/// survives exec, so dbt is started with an empty one (`spawn_unblocked`).
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(signal);
    }
    set
}

/// The parent pid, as the host sees it (`getppid` answers 0 inside a new PID namespace).
fn host_parent_pid() -> Option<i32> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

fn set_rlimits(spec: &Spec, applied: &mut Applied) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = |resource: Resource, wanted: u64| -> Result<u64, String> {
        let (_, hard) = getrlimit(resource).map_err(|e| format!("getrlimit: {e}"))?;
        // An unprivileged agent cannot raise a hard limit.
        let value = if Uid::effective().is_root() {
            wanted
        } else {
            wanted.min(hard)
        };
        setrlimit(resource, value, value).map_err(|e| format!("setrlimit {resource:?}: {e}"))?;
        Ok(value)
    };
    applied.nofile = limit(Resource::RLIMIT_NOFILE, spec.nofile)?;
    limit(Resource::RLIMIT_CORE, 0)?;
    applied.core_dumps = false;
    if let Some(nproc) = spec.nproc {
        applied.nproc = Some(limit(Resource::RLIMIT_NPROC, nproc)?);
    }
    Ok(())
}

fn unshare_pid_namespace() -> Result<(), String> {
    use nix::sched::{CloneFlags, unshare};
    if Uid::effective().is_root() {
        return unshare(CloneFlags::CLONE_NEWPID)
            .map_err(|e| format!("unshare(CLONE_NEWPID): {e}"));
    }
    // Unprivileged: a user namespace that maps only our own ids grants the right to make a PID
    // namespace, and nothing else outside it.
    let (uid, gid) = (Uid::current(), Gid::current());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("unshare(CLONE_NEWUSER | CLONE_NEWPID): {e}"))?;
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text).map_err(|e| format!("{file}: {e}"))
    };
    write("setgroups", "deny".to_owned())?;
    write("uid_map", format!("{uid} {uid} 1\n"))?;
    write("gid_map", format!("{gid} {gid} 1\n"))?;
    Ok(())
}

/// Waits for `child` while handling `signals`; returns how it ended. Termination signals go to
/// `forward`. Other children (orphans of a subreaper) are reaped on the way.
fn supervise(child: Pid, signals: &SigSet, forward: impl Fn(Signal)) -> WaitStatus {
    loop {
        let signal = match signals.wait() {
            Ok(signal) => signal,
            Err(_) => continue,
        };
        if signal != Signal::SIGCHLD {
            forward(signal);
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                    if pid == child =>
                {
                    return status;
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

fn exit_code(status: &WaitStatus) -> (Option<i32>, Option<i32>, i32) {
    match status {
        WaitStatus::Exited(_, code) => (Some(*code), None, *code),
        WaitStatus::Signaled(_, signal, _) => (None, Some(*signal as i32), 128 + *signal as i32),
        _ => (None, None, SETUP_FAILED),
    }
}

/// The wrapper stage: `slimci-agent sandbox-exec`. Never returns.
pub fn wrapper_main() -> ! {
    let mut spec = read_spec();
    let mut applied = Applied {
        landlock: "none".to_owned(),
        ..Applied::default()
    };
    // Own session and process group: the agent signals the group.
    if let Err(error) = nix::unistd::setsid() {
        applied.warnings.push(format!("setsid: {error}"));
    }
    // Die with the agent. The signal follows the agent's thread that spawned us, a thread
    // that lives as long as the agent; if the agent died before this line, we are orphaned.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() != spec.agent_pid {
        std::process::exit(SETUP_FAILED);
    }
    let signals = handled_signals();
    if let Err(error) = signals.thread_block() {
        fail(applied, format!("cannot block signals: {error}"));
    }
    if let Err(error) = set_rlimits(&spec, &mut applied) {
        fail(applied, error);
    }
    applied.cgroup_joined = !spec.cgroup_procs.is_empty();
    for procs in &spec.cgroup_procs {
        if let Err(error) = std::fs::write(procs, std::process::id().to_string()) {
            let message = format!("cannot join the build cgroup {}: {error}", procs.display());
            if spec.required {
                fail(applied, message);
            }
            applied.warnings.push(message);
            applied.cgroup_joined = false;
        }
    }
    match unshare_pid_namespace() {
        Ok(()) => applied.pid_namespace = true,
        Err(error) => {
            let message = format!("no PID namespace: {error}");
            if spec.required {
                fail(applied, message);
            }
            applied.warnings.push(message);
        }
    }
    spec.wrapper_pid = Some(std::process::id() as i32);
    spec.applied = applied.clone();
    let init = Command::new("/proc/self/exe")
        .arg(INIT_ARG)
        .env_clear()
        .env(
            SPEC_ENV,
            serde_json::to_string(&spec).expect("spec serializes"),
        )
        .spawn();
    let init = match init {
        Ok(init) => Pid::from_raw(init.id() as i32),
        Err(error) => fail(applied, format!("cannot start the sandbox init: {error}")),
    };
    let status = supervise(init, &signals, |signal| {
        let _ = kill(init, signal);
    });
    std::process::exit(exit_code(&status).2)
}

fn drop_privileges(user: &BuildUser) -> Result<(), String> {
    let gid = Gid::from_raw(user.gid);
    nix::unistd::setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setgid(gid).map_err(|e| format!("setgid({}): {e}", user.gid))?;
    nix::unistd::setuid(Uid::from_raw(user.uid))
        .map_err(|e| format!("setuid({}): {e}", user.uid))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err("could regain root after dropping it".to_owned());
    }
    Ok(())
}

fn apply_landlock(rules: &LandlockSpec, applied: &mut Applied) -> Result<(), String> {
    use landlock::{
        ABI, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope, path_beneath_rules,
    };
    let abi = ABI::V5;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|ruleset| ruleset.scope(Scope::Signal))
        .and_then(|ruleset| ruleset.create())
        .and_then(|ruleset| {
            ruleset.add_rules(path_beneath_rules(&rules.read, AccessFs::from_read(abi)))
        })
        .and_then(|ruleset| {
            ruleset.add_rules(path_beneath_rules(&rules.write, AccessFs::from_all(abi)))
        })
        .and_then(|ruleset| ruleset.restrict_self())
        .map_err(|error| format!("landlock: {error}"))?;
    applied.landlock = match status.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => "partial",
        RulesetStatus::NotEnforced => "none",
    }
    .to_owned();
    if let LandlockStatus::Available {
        effective_abi,
        kernel_abi,
    } = status.landlock
        && status.ruleset != RulesetStatus::NotEnforced
    {
        applied.landlock_abi = Some(kernel_abi.unwrap_or(effective_abi as i32) as u32);
    }
    Ok(())
}

/// Starts dbt with an empty signal mask and default signal dispositions. Init keeps the
/// termination signals blocked for itself (it waits for them), and a blocked mask survives
/// fork and exec: `std::process::Command` would hand it to dbt, which would then never see the
/// SIGTERM of a cancel and only die by the SIGKILL after the grace period. `posix_spawn` sets
/// the child's mask and dispositions itself, with no code of ours between fork and exec.
fn spawn_unblocked(spec: &Spec) -> Result<Pid, String> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    use std::ffi::CString;
    let cstring = |text: &str| CString::new(text).map_err(|_| format!("{text:?} holds a NUL byte"));
    nix::unistd::chdir(&spec.cwd)
        .map_err(|error| format!("cannot enter {}: {error}", spec.cwd.display()))?;
    let program = cstring(&spec.program.to_string_lossy())?;
    let mut args = vec![program.clone()];
    for arg in &spec.args {
        args.push(cstring(arg)?);
    }
    let env = spec
        .env
        .iter()
        .map(|(name, value)| cstring(&format!("{name}={value}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut attr = PosixSpawnAttr::init().map_err(|error| error.to_string())?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(|error| error.to_string())?;
    attr.set_sigmask(&SigSet::empty())
        .map_err(|error| error.to_string())?;
    // Rust ignores SIGPIPE in its own processes; dbt gets the default, as from a shell.
    let mut defaults = handled_signals();
    defaults.add(Signal::SIGPIPE);
    attr.set_sigdefault(&defaults)
        .map_err(|error| error.to_string())?;
    // Standard input is the agent's socket: dbt gets /dev/null instead.
    let null = std::fs::File::open("/dev/null").map_err(|error| format!("/dev/null: {error}"))?;
    let mut actions = PosixSpawnFileActions::init().map_err(|error| error.to_string())?;
    actions
        .add_dup2(null.as_raw_fd(), 0)
        .map_err(|error| error.to_string())?;
    posix_spawn(program.as_c_str(), &actions, &attr, &args, &env).map_err(|error| error.to_string())
}

/// Kills and reaps every child left (orphans reparented to us as subreaper), until none is.
fn kill_orphans() {
    let me = std::process::id() as i32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let children: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| {
                        let after = stat[stat.rfind(')')? + 1..].to_owned();
                        after.split_whitespace().nth(1)?.parse::<i32>().ok()
                    })
                    == Some(me)
            })
            .collect();
        for child in &children {
            let _ = kill(Pid::from_raw(*child), Signal::SIGKILL);
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Err(Errno::ECHILD) => return,
                Err(_) => break,
                Ok(_) => continue,
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The init stage: `slimci-agent sandbox-init`, PID 1 of the build's namespace. Never returns.
pub fn init_main() -> ! {
    let spec = read_spec();
    let mut applied = spec.applied.clone();
    let parent_alive = |wrapper: Option<i32>| wrapper.is_none() || host_parent_pid() == wrapper;
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if !parent_alive(spec.wrapper_pid) {
        std::process::exit(SETUP_FAILED);
    }
    let signals = handled_signals();
    if let Err(error) = signals.thread_block() {
        fail(applied, format!("cannot block signals: {error}"));
    }
    let in_namespace = std::process::id() == 1;
    if !in_namespace && let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        applied
            .warnings
            .push(format!("cannot become a subreaper: {error}"));
    }
    match &spec.user {
        Some(user) => {
            if let Err(error) = drop_privileges(user) {
                fail(
                    applied,
                    format!("cannot switch to user {}: {error}", user.name),
                );
            }
            // A change of credentials clears the parent-death signal.
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            if !parent_alive(spec.wrapper_pid) {
                std::process::exit(SETUP_FAILED);
            }
            applied.user = user.name.clone();
            applied.uid = user.uid;
        }
        None => {
            applied.uid = Uid::current().as_raw();
            applied.user = nix::unistd::User::from_uid(Uid::current())
                .ok()
                .flatten()
                .map(|user| user.name)
                .unwrap_or_else(|| applied.uid.to_string());
        }
    }
    if let Some(rules) = &spec.landlock {
        if let Err(error) = apply_landlock(rules, &mut applied) {
            fail(applied, error);
        }
        if applied.landlock == "none" {
            let message = "landlock is not available on this kernel: dbt can read and write whatever its user can".to_owned();
            if spec.required {
                fail(applied, message);
            }
            applied.warnings.push(message);
        } else if applied.landlock == "partial" {
            applied.warnings.push(format!(
                "landlock ABI {} enforces only part of the file rules (kernel older than 6.10)",
                applied.landlock_abi.unwrap_or_default()
            ));
        }
    }
    let child = match spawn_unblocked(&spec) {
        Ok(child) => child,
        Err(error) => fail(
            applied,
            format!("cannot start {}: {error}", spec.program.display()),
        ),
    };
    send(&Message::Report(applied));
    let status = supervise(child, &signals, |signal| {
        if in_namespace {
            // Every process of the namespace but init itself.
            let _ = kill(Pid::from_raw(-1), signal);
        } else {
            let _ = kill(child, signal);
        }
    });
    let (code, signal, exit) = exit_code(&status);
    send(&Message::Exit { code, signal });
    if !in_namespace {
        kill_orphans();
    }
    // As PID 1, exiting makes the kernel kill everything left in the namespace.
    std::process::exit(exit)
}
