{# Written by slimci for a teardown run; not part of the project. #}
{% macro slimci_drop_isolation(name, strategy, database=none) %}
  {% if not (name is string and name.startswith('pr_') and name | length <= 63) %}
    {{ exceptions.raise_compiler_error("slimci refuses to drop `" ~ name ~ "`: it is not a PR isolation name") }}
  {% endif %}
  {% if strategy == 'schemas' %}
    {# The PR's schema and its custom schemas (`<name>_<custom>`, dbt's default
       generate_schema_name), compared case-insensitively (Snowflake folds unquoted names). #}
    {# list_schemas returns the warehouse's own table: Snowflake's `show terse schemas` has the
       name in column `name`, PostgreSQL's query only `nspname`. #}
    {% set schemas = list_schemas(target.database) %}
    {% set column = 'name' if 'name' in schemas.column_names else schemas.column_names[0] %}
    {% set dropped = [] %}
    {% for schema in schemas.columns[column].values() %}
      {% if schema | lower == name or (schema | lower).startswith(name ~ '_') %}
        {% do adapter.drop_schema(api.Relation.create(database=target.database, schema=schema)) %}
        {% do dropped.append(schema) %}
      {% endif %}
    {% endfor %}
    {# drop_schema commits each drop itself (SQLAdapter). #}
    {{ log("slimci: dropped " ~ (dropped | length) ~ " schemas of " ~ name ~ " in " ~ target.database ~ ": " ~ (dropped | join(", ")), info=True) }}
  {% elif strategy == 'database' %}
    {% if database is none or target.database != database %}
      {{ exceptions.raise_compiler_error("slimci refuses to empty `" ~ target.database ~ "`: it is not the database of the isolation `" ~ name ~ "`") }}
    {% endif %}
    {% set dropped = [] %}
    {% for row in list_schemas(target.database) %}
      {% set schema = row[0] %}
      {% if schema | lower not in ['information_schema', 'pg_catalog'] %}
        {% for found in list_relations_without_caching(api.Relation.create(database=target.database, schema=schema)) %}
          {% set relation = api.Relation.create(database=found[0], schema=found[2], identifier=found[1], type=found[3]) %}
          {% do adapter.drop_relation(relation) %}
          {% do dropped.append(schema ~ '.' ~ found[1]) %}
        {% endfor %}
      {% endif %}
    {% endfor %}
    {% do adapter.commit() %}
    {{ log("slimci: dropped " ~ (dropped | length) ~ " relations of " ~ name ~ ": " ~ (dropped | join(", ")), info=True) }}
  {% else %}
    {{ exceptions.raise_compiler_error("slimci_drop_isolation: unknown strategy " ~ strategy) }}
  {% endif %}
{% endmacro %}
