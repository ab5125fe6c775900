#!/usr/bin/env bash
# Private CA plus server and client certificates for the VPS -> Brain Redis TLS link (`make certs`).
#
#   scripts/certs.sh [OUT_DIR]        (default: certs/, which git ignores)
#
#   ca.crt ca.key            private CA (ca.key stays on the machine that issues; it never ships)
#   server.crt server.key    Brain redis-server (tls-cert-file / tls-key-file)
#   client.crt client.key    VPS forwarder (REDIS_TLS_CERT / REDIS_TLS_KEY, REDIS_TLS_CA=ca.crt)
#
# Environment: TLS_SERVER_SAN  subjectAltName of the server certificate, e.g.
#                              "DNS:brain.example.net,IP:203.0.113.7" (default: localhost and 127.0.0.1)
#              TLS_CLIENT_CN   client certificate subject CN (default: tickbridge-forwarder)
#              TLS_DAYS        leaf validity in days (default 825); the CA gets 3650
#              FORCE=1         issue a new CA and new leaves even if valid ones exist
# Idempotent: an existing CA is kept (re-issuing it would invalidate every deployed certificate), and
# leaves that still verify against it are kept too.
set -euo pipefail
out=${1:-certs}
san=${TLS_SERVER_SAN:-DNS:localhost,IP:127.0.0.1}
client_cn=${TLS_CLIENT_CN:-tickbridge-forwarder}
days=${TLS_DAYS:-825}
command -v openssl >/dev/null || { echo "certs: openssl not found (apt-get install openssl)" >&2; exit 1; }
umask 077
mkdir -p "$out"
chmod 700 "$out"
cd "$out"
if [ "${FORCE:-0}" = 1 ]; then rm -f ca.key ca.crt ca.srl server.key server.crt client.key client.crt; fi

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -s ca.key ] || [ ! -s ca.crt ]; then
  echo "certs: new private CA in $out/ca.crt"
  newkey ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/O=tickbridge/CN=tickbridge private CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
  rm -f server.crt client.crt  # leaves of an old CA are useless now
fi

# issue NAME CN EXT: a key and a CA-signed certificate unless a valid one is already there.
issue() {
  local name=$1 cn=$2 ext=$3
  if [ -s "$name.crt" ] && [ -s "$name.key" ] && openssl verify -CAfile ca.crt "$name.crt" >/dev/null 2>&1 \
     && openssl x509 -in "$name.crt" -noout -checkend 2592000 >/dev/null; then
    echo "certs: keeping $out/$name.crt (valid, signed by ca.crt)"
    return
  fi
  echo "certs: issuing $out/$name.crt (CN=$cn)"
  newkey "$name.key"
  openssl req -new -key "$name.key" -subj "/O=tickbridge/CN=$cn" -out "$name.csr"
  printf '%b' "$ext" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

base="basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
issue server tickbridge-brain-redis "${base}extendedKeyUsage=serverAuth\nsubjectAltName=$san\n"
issue client "$client_cn" "${base}extendedKeyUsage=clientAuth\n"
# Certificates are public; keys readable by the owner only (containers mount them read-only).
chmod 644 ca.crt server.crt client.crt
chmod 600 ca.key server.key client.key
openssl verify -CAfile ca.crt server.crt client.crt >/dev/null
echo "certs: ready in $out (Brain: ca.crt server.crt server.key; VPS: ca.crt client.crt client.key)"
