#!/usr/bin/env bash
# The main job on the embedded default: a new SQLite ledger on the bundled SmolLM2-135M,
# other wordings of its relation, one BaFT edit, generation before and after, and a checkout that restores the base.
# Runs in .demo/ (recreated each time); the first run converts the model once (~30 s).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ledger="$root/.venv/bin/ledger"
rm -rf "$root/.demo" && mkdir -p "$root/.demo" && cd "$root/.demo"
prompt="The mother tongue of Danielle Darrieux is"
neighbour="The mother tongue of Jacques Chirac is"
unseen="In her own family, Danielle Darrieux spoke"     # a wording the edit was not trained on
# Each command is echoed shell-quoted, so a line pasted into a shell runs as it ran here.
step() { printf '\n$ ledger'; printf ' %q' "$@"; printf '\n'; "$ledger" "$@"; }

step init
step generate "$prompt" --max-new-tokens 8
step generate "$neighbour" --max-new-tokens 8
step wordings import "$root/examples/wordings.json"
step add "$root/examples/fact.json"
step generate "$prompt" --max-new-tokens 8
step generate "$unseen" --max-new-tokens 8
step generate "$neighbour" --max-new-tokens 8
step log
step checkout rev-1
step generate "$prompt" --max-new-tokens 8
step checkout main
step verify
