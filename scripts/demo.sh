#!/usr/bin/env bash
# The main job end to end on embedded defaults: SQLite, a dev-sealed root key, local files.
# Initialises a key manager, starts it over TLS, creates a tenant and a key, generates and
# decrypts a data key, rotates the key, makes a LUKS2 volume that cryptsetup also opens and moves
# data through it, and shows and verifies the audit trail.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
bash scripts/bootstrap.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH"

export KEYSTEWARD_DATA_DIR="${KEYSTEWARD_DEMO_DIR:-$(mktemp -d /tmp/keysteward-demo.XXXXXX)}"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d'+sys.argv[1]))" "$1"; }

say "keysteward server init (dev seal: demo only) in $KEYSTEWARD_DATA_DIR"
keysteward server init --seal dev --insecure-dev-seal --listen-port "$port" --json > "$KEYSTEWARD_DATA_DIR/init.json"
root_token=$(json '["root_token"]' < "$KEYSTEWARD_DATA_DIR/init.json")
echo "cluster $(json '["cluster_id"]' < "$KEYSTEWARD_DATA_DIR/init.json"), TLS CA $(json '["ca_file"]' < "$KEYSTEWARD_DATA_DIR/init.json")"

say "keysteward server start"
keysteward server start > "$KEYSTEWARD_DATA_DIR/server.log" 2>&1 &
server_pid=$!
trap 'kill $server_pid 2>/dev/null || true; wait $server_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  KEYSTEWARD_TOKEN= keysteward server status >/dev/null 2>&1 && break
  sleep 0.2
done
KEYSTEWARD_TOKEN= keysteward server status

say "keysteward tenant create acme (as the system root token)"
admin_token=$(KEYSTEWARD_TOKEN=$root_token keysteward tenant create acme --json | json '["admin_token"]["token"]')
export KEYSTEWARD_TOKEN=$admin_token
keysteward whoami

say "keysteward key create orders-db"
keysteward key create orders-db --description "orders database volume key"

say "keysteward crypto generate-data-key orders-db -c app=orders"
keysteward crypto generate-data-key orders-db -c app=orders --json > "$KEYSTEWARD_DATA_DIR/datakey.json"
plaintext=$(json '["plaintext"]' < "$KEYSTEWARD_DATA_DIR/datakey.json")
ciphertext=$(json '["ciphertext"]' < "$KEYSTEWARD_DATA_DIR/datakey.json")
echo "wrapped data key (store it beside the data): $ciphertext"

say "keysteward crypto decrypt (same encryption context)"
decrypted=$(keysteward crypto decrypt --ciphertext "$ciphertext" -c app=orders --json | json '["plaintext"]')
[ "$decrypted" = "$plaintext" ] && echo "decrypted data key matches the generated one"

say "keysteward key rotate orders-db: old ciphertexts still decrypt"
keysteward key rotate orders-db --json | json '["primary_version"]' | sed 's/^/primary version now /'
keysteward crypto decrypt --ciphertext "$ciphertext" -c app=orders --json | json '["version"]' | sed 's/^/decrypted with version /'

say "a wrong encryption context is refused"
if keysteward crypto decrypt --ciphertext "$ciphertext" -c app=billing; then exit 1; fi

say "keysteward volume create: a LUKS2 volume that cryptsetup opens too"
vol="$KEYSTEWARD_DATA_DIR/volume.img"
printf 'correct horse battery staple' > "$KEYSTEWARD_DATA_DIR/passphrase"
keysteward volume create "$vol" --size 64M --passphrase-file "$KEYSTEWARD_DATA_DIR/passphrase" --kdf argon2id \
  --pbkdf-memory 65536 --pbkdf-iterations 4 --label demo
head -c 1048576 /dev/urandom > "$KEYSTEWARD_DATA_DIR/plain.bin"
keysteward volume write "$vol" --passphrase-file "$KEYSTEWARD_DATA_DIR/passphrase" --offset 4096 \
  --input "$KEYSTEWARD_DATA_DIR/plain.bin"
keysteward volume read "$vol" --passphrase-file "$KEYSTEWARD_DATA_DIR/passphrase" --offset 4096 --length 1048576 \
  --output "$KEYSTEWARD_DATA_DIR/back.bin"
cmp "$KEYSTEWARD_DATA_DIR/plain.bin" "$KEYSTEWARD_DATA_DIR/back.bin" && echo "1 MiB written and read back through the userspace data path"
cryptsetup open --test-passphrase --key-file "$KEYSTEWARD_DATA_DIR/passphrase" "$vol" && echo "cryptsetup opens it with the same passphrase"
keysteward volume dump "$vol" | head -20

say "keysteward audit list"
keysteward audit list --last 12

say "keysteward audit verify"
keysteward audit verify
echo
echo "demo finished: data in $KEYSTEWARD_DATA_DIR (server log: $KEYSTEWARD_DATA_DIR/server.log)"
