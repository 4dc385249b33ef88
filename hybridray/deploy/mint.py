"""The script that mints a node's TLS certificate where the node's address is known only at
boot: a cloud VM (``ray up`` ``setup_commands``) or a pod (a KubeRay init container).

It signs with the node's **site** intermediate CA (never the root), writes the chain the node
sends (its certificate, then the site CA) and copies the trust bundle. It runs as any user
(the Ray image's uid 1000), reads its inputs from read-only mounts (no ``ca.srl``: the serial is
random) and writes only into its output directory. POSIX ``sh``, ``shellcheck`` clean.
"""

from __future__ import annotations

NODE_CERT_SH = r"""#!/bin/sh
# Mint this node's TLS certificate, signed by its site's intermediate CA (hybridray).
#
# Usage: node-cert.sh CA_DIR OUT_DIR [NAME_OR_IP ...]
#   CA_DIR   holds site-ca.crt and site-ca.key (this site's CA) and ca.crt (the trust
#            bundle); it may be read-only.
#   OUT_DIR  receives node.key (0600), node.crt (this node's certificate + the site CA)
#            and ca.crt (the trust bundle): RAY_TLS_SERVER_KEY/_CERT and RAY_TLS_CA_CERT.
#   NAME_OR_IP  extra subject alternative names (service names, the head's address).
# Environment: NODE_IP (default: this machine's first address from hostname -I).
# With DELETE_SITE_KEY=1 the site key is removed from CA_DIR afterwards (cloud VMs).
set -eu
if [ "$#" -lt 2 ]; then
  echo "usage: node-cert.sh CA_DIR OUT_DIR [NAME_OR_IP ...]" >&2
  exit 2
fi
CA_DIR=$1
OUT=$2
shift 2
IP=${NODE_IP:-}
if [ -z "$IP" ]; then
  IP=$(hostname -I 2>/dev/null | awk '{print $1}')
fi
if [ -z "$IP" ]; then
  echo "node-cert.sh: cannot tell this node's IP address; set NODE_IP" >&2
  exit 2
fi
for f in site-ca.crt site-ca.key ca.crt; do
  if [ ! -r "$CA_DIR/$f" ]; then
    echo "node-cert.sh: cannot read $CA_DIR/$f (hybridray certs makes it)" >&2
    exit 2
  fi
done
SAN="IP:$IP,IP:127.0.0.1,DNS:localhost"
HOST=$(hostname 2>/dev/null || true)
case $HOST in
  ''|*[!A-Za-z0-9.-]*) ;;
  *) SAN="$SAN,DNS:$HOST" ;;
esac
for name in "$@"; do
  case $name in
    ''|*[!A-Za-z0-9.:-]*)
      echo "node-cert.sh: not a host name or IP: $name" >&2
      exit 2 ;;
    *[!0-9.]*)
      case $name in
        *:*) SAN="$SAN,IP:$name" ;;
        *) SAN="$SAN,DNS:$name" ;;
      esac ;;
    *) SAN="$SAN,IP:$name" ;;
  esac
done
umask 077
mkdir -p "$OUT"
WORK="$OUT/.mint.$$"
mkdir "$WORK"
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=$SAN
EOF
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$WORK/node.key" -subj "/CN=$IP" -out "$WORK/node.csr" 2>"$WORK/err" \
  || { cat "$WORK/err" >&2; exit 1; }
openssl x509 -req -in "$WORK/node.csr" -CA "$CA_DIR/site-ca.crt" \
  -CAkey "$CA_DIR/site-ca.key" -set_serial "0x$(openssl rand -hex 16)" -days 365 \
  -sha256 -extfile "$WORK/ext" -out "$WORK/leaf.crt" 2>"$WORK/err" \
  || { cat "$WORK/err" >&2; exit 1; }
cat "$WORK/leaf.crt" "$CA_DIR/site-ca.crt" > "$WORK/node.crt"
cp "$CA_DIR/ca.crt" "$WORK/ca.crt"
mv -f "$WORK/ca.crt" "$OUT/ca.crt"
mv -f "$WORK/node.key" "$OUT/node.key"
mv -f "$WORK/node.crt" "$OUT/node.crt"
chmod 600 "$OUT/node.key"
chmod 644 "$OUT/node.crt" "$OUT/ca.crt"
if [ "${DELETE_SITE_KEY:-0}" = 1 ]; then
  rm -f "$CA_DIR/site-ca.key"
fi
echo "node-cert.sh: $OUT/node.crt for $SAN"
"""
