#!/usr/bin/env bash
# Install everything tickbridge needs on a Debian/Ubuntu machine, idempotently: a second run with
# everything present takes about a second. Used by `make deps` (and so by test, demo, bench, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${TICKBRIDGE_CACHE:-$PWD/.cache}
QUESTDB_VERSION=9.3.4
TOXIPROXY_VERSION=v2.12.0
mkdir -p "$CACHE/bin"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
apt_updated=""
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "deps: apt-get install ${missing[*]}"
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Servers and tools from Debian's packages. The packages' own services are not used: tests and the
# demo start their own processes on free ports.
need=(redis-server redis-tools prometheus prometheus-alertmanager prometheus-redis-exporter python3-venv)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
apt_install "${need[@]}"
# Debian's packages may start their services; we never rely on them.
for svc in redis-server prometheus prometheus-alertmanager prometheus-redis-exporter; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" || true
  fi
done

# QuestDB server jar from Maven Central (through Maven, by coordinates).
jar="$CACHE/questdb-$QUESTDB_VERSION.jar"
if [ ! -s "$jar" ]; then
  echo "deps: fetching org.questdb:questdb:$QUESTDB_VERSION"
  mvn -q -B dependency:get -Dartifact="org.questdb:questdb:$QUESTDB_VERSION" -Dtransitive=false
  cp "$HOME/.m2/repository/org/questdb/questdb/$QUESTDB_VERSION/questdb-$QUESTDB_VERSION.jar" "$jar.tmp"
  mv "$jar.tmp" "$jar"
fi
java_major=$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -1)
if [ "${java_major:-0}" -lt 17 ]; then echo "deps: QuestDB $QUESTDB_VERSION needs Java 17+, found ${java_major:-none}" >&2; exit 1; fi

# toxiproxy server built from the Go module proxy, pinned.
if [ ! -x "$CACHE/bin/toxiproxy-server" ]; then
  echo "deps: building toxiproxy $TOXIPROXY_VERSION"
  GOBIN="$CACHE/gobin" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv "$CACHE/gobin/server" "$CACHE/bin/toxiproxy-server"
fi

# Python virtualenv with pinned dependencies (re-installed when pyproject.toml changes).
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
stamp=.venv/.tickbridge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ services/dev/pyproject.toml -nt "$stamp" ] \
   || [ services/constraints.txt -nt "$stamp" ]; then
  # The runtime (what the image installs) and the development harness (services/dev), both editable.
  # The lock constrains the runtime's transitive dependencies too, so a fresh clone tests exactly what
  # the image ships, not whatever a transitive dependency released this morning.
  echo "deps: pip install -c services/constraints.txt -e .[dev] -e services/dev"
  .venv/bin/pip install -q --disable-pip-version-check -c services/constraints.txt -e '.[dev]' -e services/dev
  touch "$stamp"
fi
