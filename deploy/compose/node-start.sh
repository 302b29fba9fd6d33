#!/bin/sh
# Start script of a docker-compose node (see docker-compose.yml), run as the container's entrypoint:
#
#   1. make the node home ($HIVECELL_HOME: key and store) if it has none (`hivecell init`, safe to repeat);
#   2. register the node's dataset from DATASET_FILE, unless the store has a dataset of that name already;
#   3. exec the command given as arguments (default: `hivecell run`), so that the daemon receives docker's SIGTERM.
#
# Environment (set per node in docker-compose.yml; the daemon's own options are HIVECELL_* variables):
#   DATASET_NAME          name to register the dataset under (required)
#   DATASET_FILE          its .npz (features + labels) or .csv file, mounted read-only (required on the first start)
#   DATASET_TAGS          comma-separated search tags (default: digits)
#   DATASET_DESCRIPTION   what the data is, shown to scientists (default: none)
#   DATASET_SIGNOFF       auto or manual (default: manual, as `hivecell dataset add`)
#   DATASET_BUDGET        total epsilon of the dataset (DP jobs only); unset: no budget
#
# Restarts keep the home volume, so steps 1 and 2 find their work done and change nothing: the node keeps its peer
# id and its dataset as first registered. To load a changed file: `hivecell dataset remove NAME` in the container
# and restart it, or start over with `docker compose down -v` (which deletes the nodes' keys and stores).
#
# POSIX sh (the images' /bin/sh is dash); `sh -n` checks it.

set -eu

say() {
    printf 'node-start: %s\n' "$*" >&2
}

name=${DATASET_NAME:?node-start: set DATASET_NAME, the name of the dataset of this node}
file=${DATASET_FILE:-}

if [ "$#" -eq 0 ]; then
    set -- hivecell run
fi

hivecell init

# The names of the datasets the store holds, from `hivecell dataset list --json` (a JSON list of summaries).
listing=$(hivecell dataset list --json)
if printf '%s' "$listing" | python3 -c '
import json, sys
sys.exit(0 if sys.argv[1] in {d["name"] for d in json.load(sys.stdin)} else 1)
' "$name"; then
    say "dataset $name is registered already; not reading ${file:-DATASET_FILE} again"
else
    if [ -z "$file" ]; then
        say "DATASET_FILE is not set: nothing to register as $name"
        exit 6
    fi
    if [ ! -r "$file" ]; then
        say "cannot read the dataset file $file (make the data first: python3 deploy/compose/make_data.py)"
        exit 6
    fi
    register() {
        # In a function, `set --` builds the argument list without touching the script's own arguments.
        set --
        old_ifs=$IFS
        IFS=,
        set -f
        for tag in ${DATASET_TAGS:-digits}; do
            if [ -n "$tag" ]; then
                set -- "$@" --tag "$tag"
            fi
        done
        set +f
        IFS=$old_ifs
        if [ -n "${DATASET_BUDGET:-}" ]; then
            set -- "$@" --budget "$DATASET_BUDGET"
        fi
        hivecell dataset add "$name" "$file" "$@" \
            --description "${DATASET_DESCRIPTION:-}" --signoff "${DATASET_SIGNOFF:-manual}"
    }
    register
fi

say "starting: $*"
exec "$@"
