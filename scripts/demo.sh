#!/usr/bin/env bash
# Runs Muster's main job on this machine: starts PostgreSQL (and builds the
# job images) if needed, a coordinator and an enrolled runner, pushes the
# example workspace, triggers linux-patch:patch and prints its live log, then
# keeps serving until Ctrl-C. Everything it keeps lives in .muster-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$(command -v cargo)" ] || . "$HOME/.cargo/env"

env_lines=$(scripts/test-env.sh --print-env)
eval "$env_lines"
cargo build --quiet --bins

data=${MUSTER_DEMO_DIR:-$PWD/.muster-demo}
mkdir -p "$data"
admin_url=$MUSTER_TEST_DATABASE_URL
db_url=${admin_url%/*}/muster_demo
if ! psql "$admin_url" -tAc "SELECT 1 FROM pg_database WHERE datname = 'muster_demo'" | grep -q 1; then
    psql "$admin_url" -qc "CREATE DATABASE muster_demo"
fi

http=127.0.0.1:${MUSTER_DEMO_HTTP_PORT:-8080}
grpc=127.0.0.1:${MUSTER_DEMO_GRPC_PORT:-8443}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

target/debug/muster-coordinator --http-addr "$http" --grpc-addr "$grpc" \
    --database-url "$db_url" --data-dir "$data/coordinator" 2>"$data/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://$http/healthz" >/dev/null && break; sleep 0.1; done
curl -fs "http://$http/healthz" >/dev/null || { echo "demo: the coordinator did not start; see $data/coordinator.log" >&2; exit 1; }

export MUSTER_URL=http://$http
MUSTER_API_KEY=$(cat "$data/coordinator/admin-api-key")
export MUSTER_API_KEY
join=$(target/debug/muster runners join-token)
token=$(printf '%s' "$join" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
hash=$(printf '%s' "$join" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_cert_hash"])')
MUSTER_JOIN_TOKEN=$token target/debug/muster-runner --coordinator "https://$grpc" --ca-cert-hash "$hash" \
    --data-dir "$data/runner" 2>"$data/runner.log" &
pids+=($!)

target/debug/muster workspace push examples/acme-corp-automation
target/debug/muster run linux-patch patch -w acme-corp-automation --reason "demo" --wait || true

cat <<TXT

Muster is serving: API on http://$http, runners on https://$grpc
Admin API key: $data/coordinator/admin-api-key (logs: $data/*.log)
Trigger another run from a second terminal:
  curl -s -X POST http://$http/api/v1/workspaces/acme-corp-automation/actions \\
    -H "Authorization: Bearer \$(cat $data/coordinator/admin-api-key)" -H 'Content-Type: application/json' \\
    -d '{"block": "linux-patch", "action": "patch", "reason": "from curl", "parameters": {"extra_vars": {"patch_profile": "security-only"}}}'
  MUSTER_URL=http://$http MUSTER_API_KEY=\$(cat $data/coordinator/admin-api-key) target/debug/muster run linux-patch hello -w acme-corp-automation --wait
Ctrl-C stops both.
TXT
wait "${pids[0]}"
