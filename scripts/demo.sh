#!/usr/bin/env bash
# The main job end to end on embedded defaults: SQLite, a dev-sealed root key, local files.
# Initialises a key manager, starts it over TLS, creates a tenant and a key, generates and
# decrypts a data key, rotates the key, makes a LUKS2 volume that cryptsetup also opens and moves
# data through it. Then the key release story: a devcloud instance, a volume bound to the key
# manager, the agent unlocking it and writing data, a clone of the instance refused, revocation
# locking the volume on the running agent; and the audit trail shown and verified.
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
pids=()
cleanup() { for p in "${pids[@]}" $server_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
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

say "keysteward crypto generate-data-key orders-db --context app=orders"
keysteward crypto generate-data-key orders-db --context app=orders --json > "$KEYSTEWARD_DATA_DIR/datakey.json"
plaintext=$(json '["plaintext"]' < "$KEYSTEWARD_DATA_DIR/datakey.json")
ciphertext=$(json '["ciphertext"]' < "$KEYSTEWARD_DATA_DIR/datakey.json")
echo "wrapped data key (store it beside the data): $ciphertext"

say "keysteward crypto decrypt (same encryption context)"
decrypted=$(keysteward crypto decrypt --ciphertext "$ciphertext" --context app=orders --json | json '["plaintext"]')
[ "$decrypted" = "$plaintext" ] && echo "decrypted data key matches the generated one"

say "keysteward key rotate orders-db: old ciphertexts still decrypt"
keysteward key rotate orders-db --json | json '["primary_version"]' | sed 's/^/primary version now /'
keysteward crypto decrypt --ciphertext "$ciphertext" --context app=orders --json | json '["version"]' | sed 's/^/decrypted with version /'

say "a wrong encryption context is refused"
if keysteward crypto decrypt --ciphertext "$ciphertext" --context app=billing; then exit 1; fi

say "keysteward volume create: a LUKS2 volume that cryptsetup opens too"
vol="$KEYSTEWARD_DATA_DIR/volume.img"
printf 'correct horse battery staple' > "$KEYSTEWARD_DATA_DIR/passphrase"
keysteward volume create "$vol" --size 64M --passphrase-file "$KEYSTEWARD_DATA_DIR/passphrase" --pbkdf argon2id \
  --pbkdf-memory 65536 --pbkdf-force-iterations 4 --label demo
head -c 1048576 /dev/urandom > "$KEYSTEWARD_DATA_DIR/plain.bin"
keysteward volume write "$vol" --passphrase-file "$KEYSTEWARD_DATA_DIR/passphrase" --offset 4096 \
  --input "$KEYSTEWARD_DATA_DIR/plain.bin"
keysteward volume read "$vol" --passphrase-file "$KEYSTEWARD_DATA_DIR/passphrase" --offset 4096 --length 1048576 \
  --output "$KEYSTEWARD_DATA_DIR/back.bin"
cmp "$KEYSTEWARD_DATA_DIR/plain.bin" "$KEYSTEWARD_DATA_DIR/back.bin" && echo "1 MiB written and read back through the userspace data path"
cryptsetup open --test-passphrase --key-file "$KEYSTEWARD_DATA_DIR/passphrase" "$vol" && echo "cryptsetup opens it with the same passphrase"
keysteward volume dump "$vol" | head -20

say "devcloud: a stand-in cloud provider (signing key, instances, metadata service)"
export KEYSTEWARD_DEVCLOUD_STATE="$KEYSTEWARD_DATA_DIR/devcloud"
export KEYSTEWARD_CA_FILE=$(json '["ca_file"]' < "$KEYSTEWARD_DATA_DIR/init.json")
kms_url=$(json '["url"]' < "$KEYSTEWARD_DATA_DIR/init.json")
keysteward devcloud init >/dev/null
keysteward devcloud serve --port-file "$KEYSTEWARD_DATA_DIR/devcloud.url" > "$KEYSTEWARD_DATA_DIR/devcloud.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$KEYSTEWARD_DATA_DIR/devcloud.url" ] && break; sleep 0.1; done
metadata=$(cat "$KEYSTEWARD_DATA_DIR/devcloud.url")
vm=$(keysteward devcloud instance create --account 111122223333 --image img-web --json | json '["id"]')
echo "instance $vm of account 111122223333 (image img-web); its metadata service: $metadata/$vm"
keysteward devcloud certificate > "$KEYSTEWARD_DATA_DIR/devcloud.pem"
keysteward provider add devcloud --kind aws-iid --cert "$KEYSTEWARD_DATA_DIR/devcloud.pem"

say "keysteward volume create --url: a volume whose key only a release gives"
keysteward key create volumes --description "keyslot secrets of bound volumes"
bound="$KEYSTEWARD_DATA_DIR/bound.img"
keysteward volume create "$bound" --size 64M --url "$kms_url" --key-name volumes --name web-data --provider devcloud \
  --bind-account 111122223333 --bind-image img-web --kms-label env=demo --lease-seconds 6 --renew-seconds 2
keysteward volume dump "$bound" | grep -E "^(keyslot|token)"

say "on the instance: keysteward agent unlock (evidence from the metadata service, key sealed with HPKE)"
export KEYSTEWARD_METADATA_URL="$metadata/$vm"
keysteward agent unlock "$bound"
keysteward volume write "$bound" --url "$kms_url" --offset 0 --input "$KEYSTEWARD_DATA_DIR/plain.bin"
keysteward volume read "$bound" --url "$kms_url" --length 1048576 --output "$KEYSTEWARD_DATA_DIR/bound-back.bin"
cmp "$KEYSTEWARD_DATA_DIR/plain.bin" "$KEYSTEWARD_DATA_DIR/bound-back.bin" && echo "1 MiB written and read back with the released key"

say "keysteward agent run: the instance's agent holds the volume under a lease it renews"
printf 'web-data %s metadata=%s/%s,mode=userspace\n' "$bound" "$metadata" "$vm" > "$KEYSTEWARD_DATA_DIR/volumes"
keysteward agent run --config "$KEYSTEWARD_DATA_DIR/volumes" --status-file "$KEYSTEWARD_DATA_DIR/agent.json" \
  > "$KEYSTEWARD_DATA_DIR/agent.log" 2>&1 &
pids+=($!)
agent_state() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['volumes']['web-data']['state'])" "$KEYSTEWARD_DATA_DIR/agent.json" 2>/dev/null || true; }
for _ in $(seq 1 100); do [ "$(agent_state)" = open ] && break; sleep 0.1; done
echo "agent: volume web-data is $(agent_state)"
keysteward volume status web-data --url "$kms_url"

say "a clone of the instance (same disk, new instance id) asks for the key while the original runs"
clone=$(keysteward devcloud instance clone "$vm" --json | json '["id"]')
if KEYSTEWARD_METADATA_URL="$metadata/$clone" keysteward volume read "$bound" --url "$kms_url" --length 16 > /dev/null; then
  echo "the clone got the key"; exit 1
fi

say "keysteward volume revoke web-data: the running agent locks the volume at its next renewal"
keysteward volume revoke web-data --yes --url "$kms_url" --reason "demo: instance retired"
for _ in $(seq 1 150); do [ "$(agent_state)" = locked ] && break; sleep 0.1; done
echo "agent: volume web-data is $(agent_state)"
[ "$(agent_state)" = locked ]
if keysteward volume read "$bound" --url "$kms_url" --length 16 > /dev/null; then echo "revoked, yet released"; exit 1; fi

say "hypervisor hosts: a host agent starts a VM only with keys released to it (docs/hosts.md)"
keysteward ca init > /dev/null
keysteward ca issue host-a --role host --out-dir "$KEYSTEWARD_DATA_DIR/host-a" > /dev/null
guest=$(python3 -m keysteward.devcloud.guest --cache "${KEYSTEWARD_GUEST_CACHE:-$HOME/.cache/keysteward/guest}")
kernel=$(echo "$guest" | json '["kernel"]'); initrd=$(echo "$guest" | json '["initrd"]')
marker=6b657973746577617264206d61726b65  # the guest keeps it in RAM (4 MiB of it): the snapshot must not show it
keysteward volume create "$KEYSTEWARD_DATA_DIR/web-root.img" --size 8M --url "$kms_url" --key-name volumes \
  --name web-root --bind-host host-a > /dev/null
keysteward vm create web --volume "web-root=$KEYSTEWARD_DATA_DIR/web-root.img" --key-name volumes --memory 256 \
  --kernel "$kernel" --initrd "$initrd" --append "console=ttyS0 quiet panic=-1 ks.marker=$marker" \
  --lease-seconds 10 --renew-seconds 2
cat > "$KEYSTEWARD_DATA_DIR/host-a.toml" <<TOML
state_dir = "$KEYSTEWARD_DATA_DIR/host-a/run"
snapshot_dir = "$KEYSTEWARD_DATA_DIR/host-a/state"
poll_seconds = 0.3
[kms]
url = "$kms_url"
ca_file = "$KEYSTEWARD_CA_FILE"
cert_file = "$KEYSTEWARD_DATA_DIR/host-a/host-a.pem"
key_file = "$KEYSTEWARD_DATA_DIR/host-a/host-a.key"
[qemu]
accel = "tcg"
TOML
keysteward host check --config "$KEYSTEWARD_DATA_DIR/host-a.toml"
keysteward host run --config "$KEYSTEWARD_DATA_DIR/host-a.toml" > "$KEYSTEWARD_DATA_DIR/host-a.log" 2>&1 &
pids+=($!)
keysteward vm start web --host host-a
vm_id=$(keysteward vm show web --json | json '["id"]')
serial="$KEYSTEWARD_DATA_DIR/host-a/run/$(echo "$vm_id" | tr -d - | cut -c1-12)/serial.log"  # the VM's run directory
for _ in $(seq 1 300); do grep -q "ks-guest tick=2" "$serial" 2>/dev/null && break; sleep 0.2; done
grep -m 2 "ks-guest tick" "$serial"

say "keysteward vm snapshot web: memory and devices, encrypted as they stream under the VM's key"
snapshot=$(keysteward vm snapshot web --json | json '["result"]["path"]')
ls -l "$snapshot"
head -c 10 "$snapshot"; echo " (header), then Tink AES-GCM-HKDF segments"
if python3 -c "import sys; sys.exit(bytes.fromhex(sys.argv[1]) not in open(sys.argv[2], 'rb').read())" "$marker" "$snapshot"; then
  echo "the guest's RAM marker is in the snapshot"; exit 1
fi
echo "the guest's RAM marker is nowhere in the snapshot"

say "keysteward vm migrate web --to host-b: the keys follow the running VM to a host the policy accepts"
keysteward ca issue host-b --role host --out-dir "$KEYSTEWARD_DATA_DIR/host-b" > /dev/null
sed -e 's/host-a/host-b/g' "$KEYSTEWARD_DATA_DIR/host-a.toml" > "$KEYSTEWARD_DATA_DIR/host-b.toml"
keysteward host run --config "$KEYSTEWARD_DATA_DIR/host-b.toml" > "$KEYSTEWARD_DATA_DIR/host-b.log" 2>&1 &
pids+=($!)
keysteward vm migrate web --to host-b
serial_b="$KEYSTEWARD_DATA_DIR/host-b/run/$(echo "$vm_id" | tr -d - | cut -c1-12)/serial.log"
for _ in $(seq 1 100); do grep -q "ks-guest tick" "$serial_b" 2>/dev/null && break; sleep 0.2; done
echo "on host-b the guest goes on where it was (its tick count did not restart at 1):"
grep -m 1 "ks-guest tick" "$serial_b"
keysteward lease list | grep -E "host:host-(a|b)" || true

say "a policy that drains host-a: moving web back there is refused, and web runs on on host-b"
cat > "$KEYSTEWARD_DATA_DIR/drain.cedar" <<'CEDAR'
@id("drain-host-a")
forbid (principal is Keysteward::Host, action == Keysteward::Action::"vm_migrate", resource is Keysteward::Vm)
when { principal.name == "host-a" };
CEDAR
keysteward policy set "$KEYSTEWARD_DATA_DIR/drain.cedar"
if keysteward vm migrate web --to host-a; then echo "a drained host received the VM"; exit 1; fi
echo "web runs on $(keysteward vm show web --json | json '["host"]')"

say "a VM the policy keeps to hosts with memory encryption: host-a (no SEV/TDX here) is refused"
sed -n '/@id("confidential-vms-need-memory-encryption")/,$p' docs/policies/vm-hosts.cedar > "$KEYSTEWARD_DATA_DIR/vms.cedar"
keysteward policy set "$KEYSTEWARD_DATA_DIR/vms.cedar"
keysteward vm create vault --key-name volumes --memory 128 --kernel "$kernel" --initrd "$initrd" --label confidential=true > /dev/null
if keysteward vm start vault --host host-a; then echo "a host without memory encryption got the VM"; exit 1; fi
keysteward vm stop web

say "keysteward audit list"
keysteward audit list --last 16

say "keysteward audit verify"
keysteward audit verify
echo
echo "demo finished: data in $KEYSTEWARD_DATA_DIR (server log: $KEYSTEWARD_DATA_DIR/server.log)"
