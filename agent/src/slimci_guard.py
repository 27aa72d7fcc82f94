"""slimci's write guard around a CI build's `dbt build` (written by the agent; see
agent/src/job/guard.rs).

A PR's build must write only inside the PR's isolation. A project's own `generate_schema_name`
(or a `database`/`schema` config) can send a model elsewhere, production included, so before
anything executes this parses the project once, lists the nodes the build selects that write a
relation (models that are not ephemeral, seeds, snapshots), and refuses the build if any would
land outside the isolation: it prints one line `[slimci-guard] {"refused": [...]}` and exits 3.
Otherwise it runs the build on the manifest it already parsed, so the guard costs no second
parse.

Run as `python slimci_guard.py GUARD_JSON` (a cold dbt) or through `build(guard)` from the
pre-started worker. GUARD_JSON: {"parse": [dbt args], "list": [dbt args], "build": [dbt args],
"database": name, "schema": isolation or null, "case_insensitive": bool, "max_identifier": bytes
or null}. With a null schema (DuckDB, a database file per PR) only the database is checked; a
schema name longer than `max_identifier` (PostgreSQL cuts names at 63 bytes, so two PRs' custom
schemas could become one) is refused too.
"""

import json
import sys

REFUSED = 3


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

    parsed = dbtRunner().invoke(guard["parse"])
    if not parsed.success:
        return exit_code(parsed)
    manifest = parsed.result
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
        print("[slimci-guard] " + json.dumps({"refused": refused}), flush=True)
        return REFUSED
    return exit_code(dbtRunner(manifest=manifest).invoke(guard["build"]))


if __name__ == "__main__":
    sys.exit(build(json.loads(sys.argv[1])))
