# Shared by scripts/demo and scripts/test: installs what is missing on a Debian machine.
# Source it; it defines functions and sets nothing else.

slimci_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_updated=0
apt_install() {
  local missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if [ $apt_updated -eq 0 ]; then
    log "apt-get update"
    $sudo apt-get update -qq
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_build_tools() {
  if ! command -v cargo >/dev/null; then
    echo "cargo is not installed: install a Rust toolchain (1.88 or newer), e.g. with rustup" >&2
    exit 1
  fi
  apt_install git pkg-config libssl-dev gcc
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# RabbitMQ from Debian's packages, started if nothing answers on 5672.
ensure_rabbitmq() {
  if port_open 127.0.0.1 5672; then return 0; fi
  apt_install rabbitmq-server
  log "starting RabbitMQ"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    port_open 127.0.0.1 5672 && return 0
    sleep 0.5
  done
  echo "RabbitMQ did not start listening on 127.0.0.1:5672 within 60 s" >&2
  exit 1
}

# The unprivileged user an agent running as root runs dbt as (its `sandbox.user`).
SLIMCI_BUILD_USER=slimci-build
ensure_build_user() {
  [ "$(id -u)" -ne 0 ] && return 0
  id "$SLIMCI_BUILD_USER" >/dev/null 2>&1 && return 0
  log "creating the build user $SLIMCI_BUILD_USER"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$SLIMCI_BUILD_USER"
}

# Where the dbt virtualenv lives. As root it must not be under /root (mode 0700): the build
# user runs it.
slimci_cache() {
  if [ -n "${SLIMCI_CACHE:-}" ]; then
    echo "$SLIMCI_CACHE"
  elif [ "$(id -u)" -eq 0 ]; then
    echo /var/cache/slimci
  else
    echo "$HOME/.cache/slimci"
  fi
}

# dbt in a virtualenv keyed by the pinned requirements, so every checkout on this machine
# shares one install. Prints the path of the dbt executable.
ensure_dbt() {
  local root requirements hash venv python cache
  root=$(slimci_root)
  requirements="$root/scripts/requirements-dbt.txt"
  hash=$(sha256sum "$requirements" | cut -c1-16)
  cache=$(slimci_cache)
  mkdir -p "$cache"
  chmod 755 "$cache"
  venv="$cache/dbt-$hash"
  if [ ! -f "$venv/.slimci-installed" ]; then
    if [ "$(id -u)" -eq 0 ]; then
      # Debian's Python: the build user must be able to run the interpreter the virtualenv
      # links to (a pyenv Python under /root is out of its reach).
      apt_install python3 python3-venv
      python=/usr/bin/python3
    else
      python=$(command -v python3 || true)
      if [ -z "$python" ]; then apt_install python3; python=python3; fi
    fi
    "$python" -m venv --help >/dev/null 2>&1 || apt_install python3-venv
    log "installing dbt into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.slimci-installed"
  fi
  echo "$venv/bin/dbt"
}

# ansible-core and ansible-lint, pinned in ansible/requirements-controller.txt, in a virtualenv
# under slimci's cache keyed by that file's hash. Prints the virtualenv's bin directory.
ensure_ansible() {
  local root requirements hash venv python cache
  root=$(slimci_root)
  requirements="$root/ansible/requirements-controller.txt"
  hash=$(sha256sum "$requirements" | cut -c1-16)
  cache=$(slimci_cache)
  mkdir -p "$cache"
  venv="$cache/ansible-$hash"
  if [ ! -f "$venv/.slimci-installed" ]; then
    python=/usr/bin/python3
    [ -x "$python" ] || { apt_install python3; }
    "$python" -m venv --help >/dev/null 2>&1 || apt_install python3-venv
    log "installing ansible-core and ansible-lint into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.slimci-installed"
  fi
  echo "$venv/bin"
}

# What the end-to-end tests need on this machine: RabbitMQ on 5672, the tools the fault and
# GitHub App tests run, Chromium for the web page tests, the build user, dbt. Exports SLIMCI_DBT.
ensure_test_prerequisites() {
  ensure_build_tools
  ensure_rabbitmq
  # The fault tests start RabbitMQ nodes of their own, the GitHub App test makes a key, and the
  # benchmark test downloads a manifest the way a do-it-yourself CI script does.
  apt_install rabbitmq-server openssl curl
  # The PostgreSQL warehouse tests start servers of their own (initdb, pg_ctl).
  apt_install postgresql-15 postgresql-client-15
  # The web page tests load the coordinator's pages in headless Chromium.
  apt_install chromium
  ensure_build_user
  SLIMCI_DBT=$(ensure_dbt)
  export SLIMCI_DBT
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked --quiet cargo-nextest
  fi
  if [ "$(id -u)" -ne 0 ]; then
    log "not root: the sandbox tests (build user, cgroups, PID namespaces) will fail; run as root"
  fi
}

# After a nextest run: names the tests that failed (from nextest's JUnit report) and prints
# the one command that reruns just those.
report_failed_tests() {
  local junit="$1"
  [ -f "$junit" ] || return 0
  python3 - "$junit" <<'PY'
import sys, xml.etree.ElementTree as ET
failed = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        failed.append((case.get("classname", ""), case.get("name", "")))
if not failed:
    sys.exit(0)
print(f"\n\033[1m==> {len(failed)} test(s) failed:\033[0m", file=sys.stderr)
for binary, name in failed:
    print(f"    {binary} {name}", file=sys.stderr)
expression = " | ".join(f"test(={name})" for _, name in failed)
print(f"\nrerun just those with:\n    scripts/e2e -E '{expression}'\n", file=sys.stderr)
PY
}

# Whether the build user can enter `dir` (always true when not root: builds run as the caller).
build_user_reaches() {
  [ "$(id -u)" -ne 0 ] && return 0
  runuser -u "$SLIMCI_BUILD_USER" -- test -x "$1" 2>/dev/null
}

# Whether `pid` is alive (not gone, not a zombie).
running() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
