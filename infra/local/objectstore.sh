#!/usr/bin/env bash
# Start or stop a local SeaweedFS S3 endpoint on 127.0.0.1 (DESIGN §7).
#   infra/local/objectstore.sh up DIR     # starts weed, creates bucket 'satloc', writes DIR/s3.env and DIR/weed.pid
#   set -a; . DIR/s3.env; set +a          # AWS_ENDPOINT_URL and keys for clients
#   infra/local/objectstore.sh down DIR   # stops it by the recorded PID and removes its data
set -euo pipefail
if [[ $# -lt 2 || ( "$1" != up && "$1" != down ) ]]; then
    echo "usage: $0 up|down DIR [--bucket NAME] [--keep-data]" >&2
    exit 2
fi
action=$1 dir=$2
shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$python" ]] || python=python3
cd "$root"
exec "$python" -m infra.local.s3_store "$action" --dir "$dir" "$@"
