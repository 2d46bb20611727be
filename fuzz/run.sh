#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) from the committed seed corpus, and exits
# non-zero if any target crashed (a panic, a failed assertion, a timeout or running out of
# memory). New corpus entries go to a scratch directory, not to fuzz/corpus; a crashing input is
# saved under fuzz/artifacts/<target>/.
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail

seconds="${1:-30}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

targets=(mesh_config watch_query duration workload_id_identity init_flags detect request_headers proxy_flags mesh_input certify_request policy)
echo "== building the fuzz targets"
cargo +nightly fuzz build
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "== fuzz $t for ${seconds}s"
    if cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        >"$scratch/$t.log" 2>&1; then
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' \
            "$scratch/$t.log" | sed "s/^/   $t /" || true
    else
        echo "!! $t failed; the end of its log:"
        tail -n 40 "$scratch/$t.log"
        failed+=("$t")
    fi
done
if ((${#failed[@]})); then
    echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each, no crash"
