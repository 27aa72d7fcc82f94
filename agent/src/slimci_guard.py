"""slimci's write guard around a CI build's `dbt build` (written by the agent; see
agent/src/job/guard.rs).

On a server warehouse (PostgreSQL, Snowflake) it first opens one connection with the build's
profile, as `dbt debug --connection` does, and says so: `[slimci-guard] {"connected": true}`, which
ends the run's profile step; or `[slimci-guard] {"connection_error": "<the adapter's words>"}`
and exit 4, so a wrong key, role or host fails the run there, before anything is parsed.

A PR's build must write only inside the PR's isolation. A project's own `generate_schema_name`
(or a `database`/`schema` config) can send a model elsewhere, production included, so before
anything executes this parses the project once, lists the nodes the build selects that write a
relation (models that are not ephemeral, seeds, snapshots), and refuses the build if any would
land outside the isolation: it prints one line `[slimci-guard] {"refused": [...]}` and exits 3.
Otherwise it runs the build on the manifest it already parsed, so the guard costs no second
parse.

Run as `python slimci_guard.py GUARD_JSON` (a cold dbt) or through `build(guard)` from the
pre-started worker. GUARD_JSON: {"connect": [dbt args] or null, "parse": [dbt args], "list": [dbt args] or null
(a deploy: no node check), "build": [dbt args],
"database": name, "schema": isolation or null, "case_insensitive": bool, "max_identifier": bytes
or null}. With a null schema (DuckDB, a database file per PR) only the database is checked; a
schema name longer than `max_identifier` (PostgreSQL cuts names at 63 bytes, so two PRs' custom
schemas could become one) is refused too.
"""

import json
import re
import sys

REFUSED = 3
NOT_CONNECTED = 4
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def report(fields):
    print("[slimci-guard] " + json.dumps(fields), flush=True)


def connection_error(messages):
    """The adapter's own words from `dbt debug`'s result messages: dbt wraps them in "The
    database returned the following error: >..." and advice that names no setting."""
    text = ANSI.sub("", "\n".join(messages))
    found = re.search(
        r"returned the following error:\s*>(.*?)\n\s*\nCheck your database credentials",
        text,
        re.S,
    )
    if found:
        text = found.group(1)
    lines = [line.strip() for line in text.splitlines()]
    # dbt's own labels ("Database Error") and tally are not the adapter's words.
    noise = ("Database Error", "Runtime Error", "Failed to connect")
    kept = [line for line in lines if line and line not in noise and not line.endswith("check failed:")]
    return " ".join(kept)


def connect(args):
    """Opens and closes one connection with the build's profile; the error text, or None."""
    from dbt.cli.main import dbtRunner

    messages = []

    def keep(event):
        if event.info.name == "DebugCmdResult":
            messages.append(event.data.msg)

    result = dbtRunner(callbacks=[keep]).invoke(args)
    if result.success:
        return None
    if result.exception is not None and not messages:
        return str(result.exception)
    return connection_error(messages) or "dbt debug --connection failed"


def same(a, b, case_insensitive):
    if a is None or b is None:
        return a == b
    return a.lower() == b.lower() if case_insensitive else a == b


def too_long(node, guard):
    """Whether the warehouse would cut the node's schema name (PostgreSQL at 63 bytes), which
    could merge two schemas into one."""
    limit = guard.get("max_identifier")
    return limit is not None and len((node.schema or "").encode()) > limit


def inside(node, guard):
    folding = guard["case_insensitive"]
    if not same(node.database, guard["database"], folding):
        return False
    isolation = guard["schema"]
    if isolation is None:
        return True
    schema = node.schema or ""
    if folding:
        schema, isolation = schema.lower(), isolation.lower()
    return schema == isolation or schema.startswith(isolation + "_")


def exit_code(result):
    if result.success:
        return 0
    return 2 if result.exception is not None else 1


def build(guard):
    from dbt.cli.main import dbtRunner

    if guard.get("connect"):
        error = connect(guard["connect"])
        if error is not None:
            report({"connection_error": error})
            return NOT_CONNECTED
        report({"connected": True})
    parsed = dbtRunner().invoke(guard["parse"])
    if not parsed.success:
        return exit_code(parsed)
    manifest = parsed.result
    if guard.get("list") is None:
        return exit_code(dbtRunner(manifest=manifest).invoke(guard["build"]))
    listed = dbtRunner(manifest=manifest).invoke(guard["list"])
    if not listed.success:
        return exit_code(listed)
    refused = []
    for line in listed.result or []:
        unique_id = json.loads(line)["unique_id"]
        node = manifest.nodes.get(unique_id)
        if node is None or getattr(node.config, "materialized", None) == "ephemeral":
            continue
        if not inside(node, guard):
            refused.append(
                {"node": unique_id, "database": node.database, "schema": node.schema}
            )
        elif too_long(node, guard):
            refused.append(
                {
                    "node": unique_id,
                    "database": node.database,
                    "schema": node.schema,
                    "reason": "a schema name longer than %d bytes, which the warehouse would cut"
                    % guard["max_identifier"],
                }
            )
    if refused:
        report({"refused": refused})
        return REFUSED
    return exit_code(dbtRunner(manifest=manifest).invoke(guard["build"]))


if __name__ == "__main__":
    sys.exit(build(json.loads(sys.argv[1])))
