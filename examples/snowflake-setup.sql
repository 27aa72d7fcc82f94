-- What a team creates once in Snowflake for slimci (README "Warehouses" > Snowflake). Run as
-- ACCOUNTADMIN (or SECURITYADMIN for the roles and users, SYSADMIN for the rest). Names are
-- examples: ANALYTICS is production's database and schema, ANALYTICS_CI holds the PR schemas.

-- A warehouse for CI that stops paying one minute after the last query.
create warehouse if not exists SLIMCI_WH
  warehouse_size = 'XSMALL'
  auto_suspend = 60
  auto_resume = true
  initially_suspended = true;

-- A ceiling on what CI may spend each month: notify at 80 %, suspend at 100 %.
create resource monitor if not exists SLIMCI_MONITOR
  with credit_quota = 100
  frequency = monthly
  start_timestamp = immediately
  triggers on 80 percent do notify
           on 100 percent do suspend;
alter warehouse SLIMCI_WH set resource_monitor = SLIMCI_MONITOR;

-- The database PR schemas are created in (pr_<repo>_<n>, pr_<repo>_<n>_<custom>).
create database if not exists ANALYTICS_CI;

-- The CI role: reads production, owns what it creates in ANALYTICS_CI, nothing else.
create role if not exists SLIMCI_CI;
grant usage on warehouse SLIMCI_WH to role SLIMCI_CI;
grant usage on database ANALYTICS to role SLIMCI_CI;
grant usage on all schemas in database ANALYTICS to role SLIMCI_CI;
grant usage on future schemas in database ANALYTICS to role SLIMCI_CI;
grant select on all tables in database ANALYTICS to role SLIMCI_CI;
grant select on future tables in database ANALYTICS to role SLIMCI_CI;
grant select on all views in database ANALYTICS to role SLIMCI_CI;
grant select on future views in database ANALYTICS to role SLIMCI_CI;
grant usage, create schema on database ANALYTICS_CI to role SLIMCI_CI;

-- The service user the agents log in as, with key-pair authentication. Put the public key of
-- the pair whose private key is the agents' `private_key_path` (PKCS#8 PEM):
--   openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out slimci_key.p8
--   openssl pkey -in slimci_key.p8 -pubout   (paste the body without the BEGIN/END lines)
create user if not exists SLIMCI
  type = service
  default_role = SLIMCI_CI
  default_warehouse = SLIMCI_WH
  rsa_public_key = 'MIIBIjANBgkqh...';
grant role SLIMCI_CI to user SLIMCI;

-- Deploys build production. Give the role that runs slimci deploys (if slimci runs them;
-- `deploys = false` on the coordinator otherwise) ownership of production's schemas instead,
-- as your production job has today, and keep it off the CI agents' configuration.
