#!/usr/bin/env bash
# Compose secrets of one host (`make secrets HOST=vps` or `HOST=brain`): one file per password.
#
#   scripts/secrets.sh vps|brain [OUT_DIR]        (default: secrets/, which git ignores)
#
# Each file is named after its variable in lower case (secrets/questdb_password = QUESTDB_PASSWORD) and
# holds the password alone. A missing file gets the variable's value from .env when one is set there (not a
# change-me placeholder: carrying a deployed password over), else `openssl rand -hex 24`. Existing files
# are kept. brain_redis_forwarder_password is the Brain's: on the VPS it is copied from there, never made.
#
# Mode 0440: owner = the uid of the container that reads the file (tickbridge roles 10001; Grafana 472),
# group = the operator's (so `redis-cli --pass "$(cat secrets/...)"` works for them), nothing for others
# (the roles refuse a secret file open to every user). QuestDB and the init step read theirs as root.
# Changing the owner needs root: run it with sudo, or it prints the `sudo chown` to run.
# Environment: ENV_FILE (default .env).
set -euo pipefail
host=${1:-}
out=${2:-secrets}
env_file=${ENV_FILE:-.env}
case $host in
  vps) names="vps_redis_admin_password vps_redis_collector_password vps_redis_forwarder_password
              vps_redis_monitor_password brain_redis_forwarder_password questdb_password grafana_admin_password" ;;
  brain) names="brain_redis_admin_password brain_redis_forwarder_password brain_redis_consumer_password
                brain_redis_writer_password brain_redis_monitor_password brain_redis_reader_password
                questdb_password questdb_reader_password grafana_admin_password" ;;
  *) echo "secrets: usage: scripts/secrets.sh vps|brain [OUT_DIR]   (make secrets HOST=vps|brain)" >&2; exit 2 ;;
esac
command -v openssl >/dev/null || { echo "secrets: openssl not found (apt-get install openssl)" >&2; exit 1; }

# Who reads each file inside its container (QuestDB's entrypoint and the init step run as root).
owner_of() {
  case $1 in
    grafana_admin_password|questdb_reader_password) echo 472 ;;  # Grafana (admin login; QuestDB data source)
    *) echo 10001 ;;                                             # the tickbridge image's user
  esac
}

from_env() {  # the variable's value in $env_file, unless unset, empty or a placeholder
  local var value
  var=$(tr '[:lower:]' '[:upper:]' <<<"$1")
  [ -f "$env_file" ] || return 0
  value=$(grep -E "^${var}=" "$env_file" | tail -n 1 | cut -d= -f2-) || true
  if [ -n "$value" ] && ! grep -qi 'change-me' <<<"$value"; then printf '%s' "$value"; fi
}

umask 077
mkdir -p "$out"
chmod 700 "$out"
# Under sudo the directory stays the operator's (0700: only they and root, i.e. dockerd, get in).
if [ "$(id -u)" = 0 ] && [ -n "${SUDO_UID:-}" ]; then chown "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$out"; fi
group=${SUDO_GID:-$(id -g)}
pending=()
missing=0
for name in $names; do
  file=$out/$name
  if [ ! -s "$file" ]; then
    value=$(from_env "$name")
    if [ -z "$value" ] && [ "$host" = vps ] && [ "$name" = brain_redis_forwarder_password ]; then
      echo "secrets: $file missing: copy the Brain's (scp brain:tickbridge/secrets/$name $out/), then run this again" >&2
      missing=1
      continue
    fi
    if [ -n "$value" ]; then
      echo "secrets: $file from $(tr '[:lower:]' '[:upper:]' <<<"$name") in $env_file (remove it from there)"
    else
      value=$(openssl rand -hex 24)
      echo "secrets: $file generated"
    fi
    printf '%s\n' "$value" >"$file.tmp"
    mv "$file.tmp" "$file"
  fi
  owner=$(owner_of "$name")
  if [ "$(id -u)" = 0 ]; then
    chown "$owner:$group" "$file"
    chmod 0440 "$file"
  elif [ -O "$file" ]; then
    chmod 0440 "$file"
    pending+=("$owner:$file")
  elif [ "$(stat -c %u "$file")" != "$owner" ]; then
    pending+=("$owner:$file")
  fi
done
if [ ${#pending[@]} -gt 0 ]; then
  echo "secrets: give each file to the uid that reads it (needs root):"
  for item in "${pending[@]}"; do echo "  sudo chown ${item%%:*}:$group ${item#*:}"; done
fi
exit $missing
