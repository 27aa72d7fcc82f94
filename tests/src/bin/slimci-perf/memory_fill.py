# Fills a stopped coordinator's store up to a target count of runs (for bench/perf's memory figure)
# by copying its finished CI runs: row, phases, nodes, artifacts and log files, under new ids,
# older PR numbers and earlier times. Arguments: the database, the logs directory, the target.
import os, random, shutil, sqlite3, sys, uuid
db, logs, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db)
cols = [row[1] for row in con.execute("PRAGMA table_info(runs)") if row[1] != "id"]
templates = [row[0] for row in con.execute("SELECT id FROM runs WHERE kind = 'ci' AND status = 'success'")]
if not templates:
    sys.exit("no finished CI run to copy")
count = con.execute("SELECT count(*) FROM runs").fetchone()[0]
oldest = con.execute("SELECT min(created_ms) FROM runs").fetchone()[0]
def uuid7(ms):
    bits = random.getrandbits(74)
    value = (ms << 80) | (0x7 << 76) | ((bits >> 62) << 64) | (0b10 << 62) | (bits & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))
children = {}
for table in ("run_phases", "run_nodes", "artifacts"):
    children[table] = [row[1] for row in con.execute(f"PRAGMA table_info({table})") if row[1] != "run_id"]
column_list = ", ".join(cols)
made = 0
for index in range(max(0, target - count)):
    old = templates[index % len(templates)]
    shift = (index + 1) * 10_000
    new = uuid7(oldest - shift)
    pr = 10_000 + index // 5
    con.execute(f"INSERT INTO runs (id, {column_list}) SELECT ?, {column_list} FROM runs WHERE id = ?", (new, old))
    con.execute(
        "UPDATE runs SET created_ms = created_ms - ?1, started_ms = started_ms - ?1, finished_ms = finished_ms - ?1,"
        " pr_number = ?2, isolation = 'pr_shop_' || ?2 WHERE id = ?3", (shift, pr, new))
    for table, columns in children.items():
        listed = ", ".join(columns)
        con.execute(f"INSERT INTO {table} (run_id, {listed}) SELECT ?, {listed} FROM {table} WHERE run_id = ?", (new, old))
    source = os.path.join(logs, old)
    if os.path.isdir(source):
        shutil.copytree(source, os.path.join(logs, new))
    made += 1
con.commit()
con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
print(made, con.execute("SELECT count(*) FROM runs").fetchone()[0])
