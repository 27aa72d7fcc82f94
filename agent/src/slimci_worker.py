"""slimci's pre-started dbt (written by the agent; see agent/src/warm.rs).

The agent starts this in the sandbox of a slot's next build, before that build's job arrives:
Python and dbt are loaded (about 2 s of every dbt invocation) while the slot waits. At that
point landlock allows what any build of this agent may touch (all run directories, the
warehouse); only dbt's own code has run. The job arrives as one JSON document on the FIFO named
in argv[1]: dbt's arguments, working directory, environment and the build's own landlock rules.
This process confines itself to those rules (a second ruleset: the kernel enforces both, so it
can only narrow), takes the environment, and runs dbt's command line in-process, exactly as the
`dbt` executable would. Nothing of the project is read before the narrowing.
"""

import ctypes
import json
import os
import select
import sys

FIFO = sys.argv[1]
# Open before loading dbt, so the agent can hand over a job at any moment.
JOB_FD = os.open(FIFO, os.O_RDONLY | os.O_NONBLOCK)

import dbt.cli.main  # noqa: E402,F401  (the point of starting early)

try:
    import dbt.adapters.duckdb  # noqa: E402,F401
except Exception:  # another adapter: loaded on use instead
    pass

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
RULE_PATH_BENEATH = 1
CREATE_RULESET_VERSION = 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def fail(message):
    print(f"[slimci-worker] error: {message}", flush=True)
    sys.exit(125)


def confine(rules):
    """Applies landlock rules {read: [...], write: [...]}; returns the kernel's ABI or 0."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    if abi < 1:
        return 0  # no landlock on this kernel: the sandbox already reported and warned
    handled = (1 << 13) - 1
    if abi >= 2:
        handled |= REFER
    if abi >= 3:
        handled |= TRUNCATE
    if abi >= 5:
        handled |= IOCTL_DEV
    attr = RulesetAttr(handled)
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        fail(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    for paths, rights in ((rules.get("read", []), READ_RIGHTS), (rules.get("write", []), handled)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # like the agent's own rules: a missing path allows nothing
            allowed = rights & handled
            if not os.path.isdir(path):
                allowed &= FILE_RIGHTS
            rule = PathBeneath(allowed, fd)
            added = libc.syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
            os.close(fd)
            if added < 0:
                fail(f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
    if libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        fail(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    os.close(ruleset)
    return abi


def read_job():
    chunks = []
    while True:
        select.select([JOB_FD], [], [])
        try:
            chunk = os.read(JOB_FD, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            if chunks:
                break
            fail("the agent closed the job FIFO without a job")
        chunks.append(chunk)
    os.close(JOB_FD)
    return json.loads(b"".join(chunks))


def main():
    job = read_job()
    abi = confine(job["landlock"])
    print("[slimci-worker] " + json.dumps({"landlock_abi": abi}), flush=True)
    os.environ.clear()
    os.environ.update(dict(job["env"]))
    import tempfile

    tempfile.tempdir = None
    os.chdir(job["cwd"])
    if job.get("guard") is not None:
        # Beside this script (see agent/src/job/guard.rs). Neither file's name starts with
        # `dbt_`: dbt imports every top-level `dbt_*` module it finds as a plugin.
        import slimci_guard

        sys.exit(slimci_guard.build(job["guard"]))
    sys.argv = ["dbt", *job["args"]]
    from dbt.cli.main import cli

    sys.exit(cli())


main()
