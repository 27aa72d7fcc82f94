#!/usr/bin/env python3
"""Generate a synthetic dbt Core project for benchmarking Slim CI on DuckDB.

    bench/genproject.py [--models 1400] --out DIR [--seed 1] [--tests full|staging]

The output is deterministic: the same arguments give byte-identical files (no timestamps,
sorted iteration, a single ``random.Random(seed)``). DIR is (re)created: a DIR that exists and
is not empty is refused unless it holds the marker file ``.slimci-bench-project`` that this
script writes, in which case it is deleted and generated afresh.

The project (dbt ``name: bench``, ``profile: bench``; no profiles.yml, no sources, no network):

- ``seeds/raw_<k>.csv``, k = 1..20: ~50 rows each, columns
  ``id, customer_id, amount_cents, status, created_at`` (ids unique per seed, ISO dates).
- A local package ``vendor/bench_utils`` (``packages.yml``: ``- local: vendor/bench_utils``)
  with the macros ``cents_to_dollars(col)``, ``safe_div(a, b)`` and ``clean_status(col)``;
  run ``dbt deps`` before building (``package-lock.yml`` is generated too, as dbt 1.11 writes
  it, so ``dbt deps`` leaves the tree unchanged).
- N models numbered 0001..N across layers (staging first, then intermediate, then marts), so
  ``stg_0001`` is always the first staging model:

  * ~30% ``models/staging/stg_NNNN.sql`` (views): one seed each, columns renamed and cast.
  * ~45% ``models/intermediate/int_NNNN.sql`` (views): 1-3 earlier staging or intermediate
    models, filtered, left-joined on ``id`` or unioned and grouped by ``id``.
  * ~25% ``models/marts/fct_NNNN.sql`` / ``dim_NNNN.sql`` (tables): 1-3 intermediates,
    aggregated per ``id`` (fct) or per ``customer_id`` (dim).

  Every model exposes ``id, customer_id, amount, status, created_at`` (staging models also
  ``bench_revision``; marts also ``row_count``), and ``id`` is unique and not null in all of them.
  Models are grouped into domains of ~50 models; a model's parents come from its own domain
  (marts occasionally from another), so most models have few descendants and ``stg_0001`` has a
  moderate fan-out, printed as ``stg_0001_descendants`` (14 for 1,400 models and seed 1; over
  seeds 1-30 it ranges from 3 to 22, median 15).

- Tests in ``models/<layer>/_schema.yml``: ``unique`` + ``not_null`` on ``id`` for every staging
  model and, with ``--tests full``, ``not_null`` on ``id`` for every intermediate and mart.
  ``--tests staging`` (the default) leaves out the latter (1,400 models: 2,260 nodes instead of
  3,240).

The one-line change the benchmark makes: every staging model contains exactly one line matching

    ^    'r[0-9]+' as bench_revision,$

(four spaces, a quoted revision, ``as bench_revision,``), generated as ``    'r0' as bench_revision,``.
Rewriting it to ``    'r<i>' as bench_revision,`` changes that model's SQL only (state:modified
selects it and its own tests) while keeping the SQL valid; the column is not used downstream.

The last line on stdout is a summary:

    genproject models=<n> staging=<n> intermediate=<n> marts=<n> tests=<n> seeds=<n> stg_0001_descendants=<n>
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

MARKER = ".slimci-bench-project"
SEEDS = 20
DOMAIN_SIZE = 50  # models per domain
STATUSES = ("placed", "shipped", "completed", "returned", "cancelled")
COLUMNS = "id, customer_id, amount, status, created_at"


def fail(message: str) -> None:
    print(f"genproject: {message}", file=sys.stderr)
    sys.exit(2)


def prepare_out(out: Path) -> None:
    """Create an empty `out`, deleting an earlier generated project there (never anything else)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        fail(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            fail(f"{out} is not empty and has no {MARKER} marker; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


class Writer:
    """Writes text files under a root with LF line endings, counting them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = 0

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        self.files += 1


# --- the DAG --------------------------------------------------------------------------------


class Model:
    def __init__(self, number: int, layer: str, name: str, domain: int) -> None:
        self.number = number
        self.layer = layer  # staging | intermediate | marts
        self.name = name
        self.domain = domain
        self.parents: list[Model] = []
        self.seed = 0  # staging only: the raw_<k> it reads
        self.shape = ""  # how the SQL combines its parents

    @property
    def path(self) -> str:
        return f"models/{self.layer}/{self.name}.sql"


def layer_counts(n: int) -> tuple[int, int, int]:
    staging = round(n * 0.30)
    intermediate = round(n * 0.45)
    return staging, intermediate, n - staging - intermediate


def build_dag(n: int, rng: random.Random) -> list[Model]:
    n_stg, n_int, n_mart = layer_counts(n)
    domains = max(1, round(n / DOMAIN_SIZE))
    models: list[Model] = []
    number = 0

    def new(layer: str, prefix: str, domain: int) -> Model:
        nonlocal number
        number += 1
        m = Model(number, layer, f"{prefix}_{number:04d}", domain)
        models.append(m)
        return m

    stg_by_domain: list[list[Model]] = [[] for _ in range(domains)]
    for i in range(n_stg):
        m = new("staging", "stg", i % domains)
        m.seed = i % SEEDS + 1
        stg_by_domain[m.domain].append(m)

    # Intermediates: 1-3 parents from the same domain. The first parent is a staging model of the
    # domain that nothing reads yet, while there is one, so every staging model is used; the
    # others are staging models or one of the few latest intermediates of the domain.
    def pick_staging(d: int) -> Model:
        # Zipf-like: the first staging models of a domain are its hubs (think stg_orders).
        pool = stg_by_domain[d]
        return rng.choices(pool, weights=[1 / (rank + 1) for rank in range(len(pool))])[0]

    int_by_domain: list[list[Model]] = [[] for _ in range(domains)]
    unused_stg = [list(ms) for ms in stg_by_domain]
    for i in range(n_int):
        d = i % domains
        m = new("intermediate", "int", d)
        wanted = rng.choices((1, 2, 3), weights=(35, 45, 20))[0]
        if unused_stg[d]:
            first = unused_stg[d].pop(0)
        elif int_by_domain[d] and rng.random() < 0.5:
            first = rng.choice(int_by_domain[d][-4:])
        else:
            first = pick_staging(d)
        parents = [first]
        for _ in range(wanted - 1):
            if int_by_domain[d] and rng.random() < 0.4:
                p = rng.choice(int_by_domain[d][-4:])
            else:
                p = pick_staging(d)
            if p not in parents:
                parents.append(p)
        m.parents = parents
        if len(parents) == 1:
            m.shape = rng.choice(("filter", "scale"))
        else:
            m.shape = rng.choice(("join", "union"))
        int_by_domain[d].append(m)

    # Marts: 1-3 intermediates, mostly of the same domain; intermediates nothing reads yet first.
    all_int = [m for m in models if m.layer == "intermediate"]
    all_stg = [m for m in models if m.layer == "staging"]
    unused_int = [list(ms) for ms in int_by_domain]
    for i in range(n_mart):
        d = i % domains
        prefix = "fct" if rng.random() < 0.6 else "dim"
        m = new("marts", prefix, d)
        pool = int_by_domain[d] or all_int or all_stg
        wanted = rng.choices((1, 2, 3), weights=(40, 40, 20))[0]
        parents: list[Model] = []
        if unused_int[d]:
            parents.append(unused_int[d].pop(0))
        for _ in range(wanted - len(parents)):
            if all_int and rng.random() < 0.1:
                p = rng.choice(all_int)  # a cross-domain mart
            else:
                p = rng.choice(pool)
            if p not in parents:
                parents.append(p)
        m.parents = parents
        m.shape = prefix
    return models


def descendants(model: Model, models: list[Model]) -> int:
    children: dict[str, list[Model]] = {m.name: [] for m in models}
    for m in models:
        for p in m.parents:
            children[p.name].append(m)
    seen: set[str] = set()
    stack = [model]
    while stack:
        for c in children[stack.pop().name]:
            if c.name not in seen:
                seen.add(c.name)
                stack.append(c)
    return len(seen)


# --- SQL ------------------------------------------------------------------------------------


def ref(m: Model) -> str:
    return "{{ ref('" + m.name + "') }}"


def staging_sql(m: Model) -> str:
    return f"""-- Generated by bench/genproject.py. Staging: raw_{m.seed}, renamed and cast.

select
    'r0' as bench_revision,
    cast(id as integer) as id,
    cast(customer_id as integer) as customer_id,
    {{{{ bench_utils.cents_to_dollars('amount_cents') }}}} as amount,
    {{{{ bench_utils.clean_status('status') }}}} as status,
    cast(created_at as date) as created_at
from {{{{ ref('raw_{m.seed}') }}}}
"""


def union_grouped(parents: list[Model], key: str, extra: str = "") -> str:
    """Union of the parents, one row per `key` (id or customer_id)."""
    union = "\n\n    union all\n\n".join(f"    select {COLUMNS} from {ref(p)}" for p in parents)
    id_expr = "id" if key == "id" else "customer_id as id"
    cust_expr = "min(customer_id) as customer_id" if key == "id" else "customer_id"
    return f"""with unioned as (

{union}

)

select
    {id_expr},
    {cust_expr},
    sum(amount) as amount,
    min(status) as status,
    max(created_at) as created_at{extra}
from unioned
group by {key}
"""


def intermediate_sql(m: Model) -> str:
    head = f"-- Generated by bench/genproject.py. Intermediate ({m.shape}).\n\n"
    ps = m.parents
    if m.shape == "filter":
        return head + f"""select {COLUMNS}
from {ref(ps[0])}
where status <> 'cancelled'
"""
    if m.shape == "scale":
        return head + f"""select
    id,
    customer_id,
    round({{{{ bench_utils.safe_div('amount * 100', '100 + id % 7') }}}}, 2) as amount,
    status,
    created_at
from {ref(ps[0])}
"""
    if m.shape == "union":
        return head + union_grouped(ps, "id")
    # join: the first parent, left-joined to the others aggregated per id (no fan-out, ids kept)
    joins, adds = [], []
    for k, p in enumerate(ps[1:], start=1):
        joins.append(f"""left join (
    select id, sum(amount) as amount
    from {ref(p)}
    group by id
) as p{k}
    on p0.id = p{k}.id""")
        adds.append(f" + coalesce(p{k}.amount, 0)")
    join_text = "\n".join(joins)
    return head + f"""select
    p0.id,
    p0.customer_id,
    p0.amount{''.join(adds)} as amount,
    p0.status,
    p0.created_at
from {ref(ps[0])} as p0
{join_text}
"""


def mart_sql(m: Model) -> str:
    if m.shape == "fct":
        head = "-- Generated by bench/genproject.py. Fact: one row per id.\n\n"
        return head + union_grouped(m.parents, "id", ",\n    count(*) as row_count")
    head = "-- Generated by bench/genproject.py. Dimension: one row per customer.\n\n"
    return head + union_grouped(m.parents, "customer_id", ",\n    count(*) as row_count")


def schema_yml(models: list[Model], full: bool) -> tuple[str, int]:
    lines = ["version: 2", "", "models:"]
    tests = 0
    for m in models:
        if m.layer == "staging":
            names = ["unique", "not_null"]
        elif full:
            names = ["not_null"]
        else:
            names = []
        lines.append(f"  - name: {m.name}")
        if names:
            lines.append("    columns:")
            lines.append("      - name: id")
            lines.append("        data_tests:")
            lines.extend(f"          - {t}" for t in names)
        tests += len(names)
    return "\n".join(lines) + "\n", tests


# --- static files ---------------------------------------------------------------------------

DBT_PROJECT = """# Generated by bench/genproject.py; do not edit.
name: bench
version: "1.0.0"
config-version: 2

profile: bench

model-paths: ["models"]
seed-paths: ["seeds"]
macro-paths: ["macros"]

target-path: "target"
clean-targets:
  - "target"
  - "dbt_packages"

models:
  bench:
    staging:
      +materialized: view
    intermediate:
      +materialized: view
    marts:
      +materialized: table
"""

PACKAGES = """packages:
  - local: vendor/bench_utils
"""


def package_lock() -> str:
    """package-lock.yml as `dbt deps` (1.11) writes it, so that running it leaves the tree as it is.

    The hash is dbt's: SHA-1 of the sorted JSON dumps of the rendered package specs. Should another
    dbt version hash differently, `dbt deps` merely rewrites the file.
    """
    entry = {"local": "vendor/bench_utils"}
    spec = json.dumps({**entry, "unrendered": entry}, sort_keys=True)
    digest = hashlib.sha1(spec.encode("utf-8")).hexdigest()
    return f"""packages:
  - local: vendor/bench_utils
    name: bench_utils
sha1_hash: {digest}
"""


UTILS_PROJECT = """name: bench_utils
version: "1.0.0"
config-version: 2

macro-paths: ["macros"]
"""

UTILS_MACROS = {
    "cents_to_dollars.sql": """{% macro cents_to_dollars(column) -%}
    cast({{ column }} as decimal(18, 2)) / 100
{%- endmacro %}
""",
    "safe_div.sql": """{% macro safe_div(numerator, denominator) -%}
    case when ({{ denominator }}) = 0 then null else ({{ numerator }}) / ({{ denominator }}) end
{%- endmacro %}
""",
    "clean_status.sql": """{% macro clean_status(column) -%}
    lower(trim(cast({{ column }} as varchar)))
{%- endmacro %}
""",
}

GITIGNORE = """dbt_packages/
target/
logs/
"""


def readme(args: argparse.Namespace, summary: str) -> str:
    return f"""# bench: a generated dbt project

Generated by `bench/genproject.py --models {args.models} --seed {args.seed} --tests {args.tests}`
in the slimci repository; do not edit it by hand, regenerate it. The same arguments always give
the same files.

    {summary}

It has no profiles.yml: it needs a profile named `bench` (DuckDB). Run `dbt deps` (the local
package `vendor/bench_utils`) before `dbt build`.

Every staging model has one line `    'r0' as bench_revision,`; the benchmark rewrites it to
`    'r<i>' as bench_revision,` to make a one-line change to a model (usually `stg_0001`).
"""


def seed_csv(k: int, rng: random.Random) -> str:
    rows = ["id,customer_id,amount_cents,status,created_at"]
    start = datetime.date(2024, 1, 1)
    for i in range(1, rng.randint(45, 55) + 1):
        day = start + datetime.timedelta(days=rng.randrange(365))
        rows.append(
            f"{i},{rng.randint(1, 25)},{rng.randint(100, 50000)},"
            f"{rng.choice(STATUSES)},{day.isoformat()}"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1400, help="number of models (default 1400)")
    parser.add_argument("--out", type=Path, required=True, help="directory to (re)create")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--tests",
        choices=("full", "staging"),
        default="staging",
        help="staging: unique and not_null on staging ids (default; 1,400 models make 2,260 nodes, "
        "close to the 2,201 of the project the issue's figures were measured on); full: also "
        "not_null on id of intermediates and marts",
    )
    args = parser.parse_args()
    if args.models < 10:
        fail("--models must be at least 10")

    rng = random.Random(args.seed)
    models = build_dag(args.models, rng)
    seeds = [seed_csv(k, rng) for k in range(1, SEEDS + 1)]

    prepare_out(args.out)
    w = Writer(args.out)
    w.write(MARKER, "Generated by bench/genproject.py; the directory may be deleted by it.\n")
    w.write(".gitignore", GITIGNORE)
    w.write("dbt_project.yml", DBT_PROJECT)
    w.write("packages.yml", PACKAGES)
    w.write("package-lock.yml", package_lock())
    w.write("macros/.gitkeep", "")
    w.write("vendor/bench_utils/dbt_project.yml", UTILS_PROJECT)
    for name in sorted(UTILS_MACROS):
        w.write(f"vendor/bench_utils/macros/{name}", UTILS_MACROS[name])
    for k, text in enumerate(seeds, start=1):
        w.write(f"seeds/raw_{k}.csv", text)

    tests = 0
    for layer in ("staging", "intermediate", "marts"):
        in_layer = [m for m in models if m.layer == layer]
        for m in in_layer:
            if layer == "staging":
                w.write(m.path, staging_sql(m))
            elif layer == "intermediate":
                w.write(m.path, intermediate_sql(m))
            else:
                w.write(m.path, mart_sql(m))
        text, count = schema_yml(in_layer, args.tests == "full")
        w.write(f"models/{layer}/_schema.yml", text)
        tests += count

    n_stg, n_int, n_mart = layer_counts(args.models)
    summary = (
        f"genproject models={len(models)} staging={n_stg} intermediate={n_int} marts={n_mart} "
        f"tests={tests} seeds={SEEDS} stg_0001_descendants={descendants(models[0], models)}"
    )
    w.write("README.md", readme(args, summary))
    print(summary)


if __name__ == "__main__":
    main()
