#!/usr/bin/env bash
# End-to-end demo on loopback, with real servers:
#   exporter (static kubecost-shaped metrics) <- vmagent (scrapes, remote-writes with
#   Cloud-Account-Id + basic auth) -> rwgate -> Prometheus 2.42 (remote-write receiver,
#   standing in for Thanos receive)
#                                        \-> ClickHouse 18.16 (raw cost samples, expense rows)
# Shows which series arrived with which labels, what rwgate dropped, and the
# expense rows the tee derived from the cost gauges.
# Usage: scripts/demo.sh [--keep]   (--keep leaves everything running until Ctrl-C)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"   # clickhouse-server lives in /usr/sbin

bash scripts/install-deps.sh
echo "== building rwgate (release)"
cargo build --release --quiet --bin rwgate
RWGATE=$PWD/target/release/rwgate

work=$(mktemp -d /tmp/rwgate-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url, what
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "demo: $2 did not come up at $1 (logs in $work)" >&2
  exit 1
}

ACCOUNT=3f0c6d1e-5b8a-4c2e-9a41-7d2f0e6b8c11
OTHER=9b1d2c3e-0000-4000-8000-00000000beef
CREDS=$(printf 'demo:s3cret' | base64)

prom_port=$(port); rw_port=$(port); vm_port=$(port); exp_port=$(port)
ch_http=$(port); ch_tcp=$(port); ch_inter=$(port)

echo "== starting ClickHouse on :$ch_http"
bash scripts/clickhouse-config.sh "$work/ch" "$ch_http" "$ch_tcp" "$ch_inter"
(cd "$work/ch" && exec clickhouse-server --config-file="$work/ch/config.xml" >"$work/clickhouse.log" 2>&1) &
pids+=($!)
wait_http "http://127.0.0.1:$ch_http/ping" "ClickHouse"
ch() { curl -fsS "http://127.0.0.1:$ch_http/" --data-binary "$1"; }

echo "== starting Prometheus 2.42 as the remote-write receiver on :$prom_port"
mkdir -p "$work/prom"
printf 'global:\n  scrape_interval: 1m\n' > "$work/prom.yml"
prometheus --config.file="$work/prom.yml" --storage.tsdb.path="$work/prom" \
  --web.enable-remote-write-receiver --web.listen-address="127.0.0.1:$prom_port" \
  >"$work/prometheus.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$prom_port/-/ready" "Prometheus"

echo "== starting a static exporter with kubecost-shaped gauges on :$exp_port"
mkdir -p "$work/exporter"
cat > "$work/exporter/metrics" <<METRICS
# A namespace cost rate (USD/h), spoofing another tenant's account id.
cloudtuner_kubecost_namespace_total_cost{cluster="demo",namespace="shop",tenant_id="$OTHER",cloud_account_id="$OTHER",currency="USD"} 0.42
cloudtuner_kubecost_namespace_total_cost{cluster="demo",namespace="db",currency="USD"} 1.25
kube_pod_info{namespace="shop",pod="web-0"} 1
container_cpu_usage_seconds_total{namespace="shop",pod="web-0",container="web"} 123.5
go_goroutines 42
prometheus_http_requests_total{code="200"} 7
METRICS
(cd "$work/exporter" && exec python3 -m http.server "$exp_port" --bind 127.0.0.1 >"$work/exporter.log" 2>&1) &
pids+=($!)
wait_http "http://127.0.0.1:$exp_port/metrics" "exporter"

echo "== starting rwgate on :$rw_port (static tenants file)"
cat > "$work/tenants.toml" <<TENANTS
[[tenant]]
id = "$ACCOUNT"
credentials = "$CREDS"
TENANTS
"$RWGATE" serve --listen "127.0.0.1:$rw_port" --auth static --tenants-file "$work/tenants.toml" \
  --upstream-url "http://127.0.0.1:$prom_port/api/v1/write" \
  --clickhouse-url "http://127.0.0.1:$ch_http" --spool-dir "$work/spool" \
  --rollup --rollup-interval 2s --expense-grain day --charge namespace \
  >"$work/rwgate.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$rw_port/-/ready" "rwgate"

echo "== starting vmagent: scrape the exporter every 2s, remote-write to rwgate as $ACCOUNT"
cat > "$work/scrape.yml" <<SCRAPE
scrape_configs:
  - job_name: allocation-exporter
    scrape_interval: 2s
    static_configs:
      - targets: ["127.0.0.1:$exp_port"]
SCRAPE
start_vmagent() {
  vmagent -httpListenAddr="127.0.0.1:$vm_port" -promscrape.config="$work/scrape.yml" \
    -remoteWrite.url="http://127.0.0.1:$rw_port/storage/api/v2/write" \
    -remoteWrite.headers="Cloud-Account-Id: $ACCOUNT" \
    -remoteWrite.basicAuth.username=demo -remoteWrite.basicAuth.password=s3cret \
    -remoteWrite.tmpDataPath="$work/vmagent" -remoteWrite.flushInterval=1s \
    >>"$work/vmagent.log" 2>&1 &
  pids+=($!)
}
start_vmagent

echo "== waiting for the series to reach the receiver"
q="http://127.0.0.1:$prom_port/api/v1/series"
for _ in $(seq 1 60); do
  n=$(curl -fsS -G "$q" --data-urlencode 'match[]={job="allocation-exporter"}' \
      | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]))' 2>/dev/null || echo 0)
  [ "$n" -ge 5 ] && break
  sleep 0.5
done

echo
echo "== series in the receiver (what Thanos would store), job=allocation-exporter:"
curl -fsS -G "$q" --data-urlencode 'match[]={job="allocation-exporter"}' | python3 -c '
import json, sys
for s in sorted(json.load(sys.stdin)["data"], key=lambda s: s["__name__"]):
    name = s.pop("__name__")
    print("  " + name + "{" + ", ".join(f"{k}=\"{v}\"" for k, v in sorted(s.items())) + "}")
'
echo
echo "   Every series carries cloud_account_id and tenant_id = $ACCOUNT, including the one"
echo "   that claimed to be $OTHER."
sleep 3   # a few more scrapes
echo "== stopping vmagent, so that the figures below stay put"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
echo
echo "== rwgate's own counters:"
metrics=$(curl -fsS "http://127.0.0.1:$rw_port/metrics")
grep -E '^rwgate_(samples_(received|forwarded|dropped)_total|requests_total)' <<<"$metrics" | sed 's/^/  /'
metric() { awk -v m="$1" '$1 == m {print $2}' <<<"$metrics"; }
received=$(metric rwgate_samples_received_total)
forwarded=$(metric rwgate_samples_forwarded_total)
dropped=$(metric 'rwgate_samples_dropped_total{reason="allowlist"}')
requests=$(metric 'rwgate_requests_total{route="storage_write",status="204"}')
echo "   $requests requests (one per scrape), $received samples: each scrape is the exporter's 6"
echo "   series, up, and vmagent's 5 series about the scrape (scrape_duration_seconds,"
echo "   scrape_samples_scraped, ...). rwgate forwarded $forwarded and dropped $dropped: per scrape"
echo "   go_goroutines, prometheus_http_requests_total and the 5 scrape_* series, which the"
echo "   allowlist does not name."
if [ "$received" != $((12 * requests)) ] || [ "$forwarded" != $((5 * requests)) ] \
   || [ "$dropped" != $((7 * requests)) ]; then
  echo "   (these counts are not 12, 5 and 7 per scrape: see $work/vmagent.log)"
fi
echo
echo "== waiting for the tee: the spool drained into ClickHouse, every raw sample charged"
for _ in $(seq 1 60); do
  spooled=$(curl -fsS "http://127.0.0.1:$rw_port/metrics" | awk '$1 == "rwgate_tee_spool_bytes" {print $2}')
  [ "${spooled:-1}" = 0 ] && break
  sleep 0.5
done
# What the money rule charges for each namespace: its first sample the
# nominal 60 s step, each later one the time since the previous sample.
expected="SELECT namespace, count() AS samples, min(value) AS usd_per_h,
    (max(ts) - min(ts)) / 1000 AS later_s, round(usd_per_h * (60 + later_s) / 3600, 9) AS usd
  FROM kubecost_samples FINAL GROUP BY namespace ORDER BY namespace"
for _ in $(seq 1 60); do
  want=$(ch "SELECT sum(usd) FROM ($expected)" 2>/dev/null || echo 0)
  got=$(ch "SELECT SUM(cost * sign) FROM expenses" 2>/dev/null || echo 0)
  python3 -c "import sys; sys.exit(0 if abs(float('$want') - float('$got')) < 1e-8 and float('$got') > 0 else 1)" && break
  sleep 0.5
done
echo
echo "== raw cost samples kept (kubecost_samples FINAL), per series:"
ch "SELECT metric, namespace, count() AS samples, min(value) AS rate_usd_per_h
    FROM kubecost_samples FINAL GROUP BY metric, namespace ORDER BY namespace
    FORMAT PrettyCompactNoEscapes" | sed 's/^/  /'
echo
echo "== expense rows, read the way the platform REST API reads them"
echo "   (SUM(cost * sign) ... HAVING SUM(sign) > 0, never FINAL):"
ch "SELECT cloud_account_id, resource_id, k8s_namespace, date, round(SUM(cost * sign), 9) AS cost
    FROM expenses GROUP BY cloud_account_id, resource_id, k8s_namespace, date
    HAVING SUM(sign) > 0 ORDER BY resource_id FORMAT PrettyCompactNoEscapes" | sed 's/^/  /'
echo "   The first sample of a namespace is charged the nominal 60 s step, each later one"
echo "   the time since the previous sample (vmagent scrapes every 2 s): rate x seconds / 3600."
ch "SELECT namespace, samples, usd_per_h, later_s, usd FROM ($expected) FORMAT TSV" |
  while IFS=$'\t' read -r ns n rate later usd; do
    printf '   %s: %s samples at %s USD/h, charged %s USD/h x (60 s + %s s) / 3600 s = %s USD\n' \
      "$ns" "$n" "$rate" "$rate" "$later" "$usd"
  done
echo
echo "== a request without credentials is refused as diproxy did:"
curl -sS -o /dev/stderr -w '  HTTP %{http_code}\n' -X POST -H "Cloud-Account-Id: $ACCOUNT" \
  -H 'Content-Type: application/x-protobuf' -H 'Content-Encoding: snappy' \
  --data-binary x "http://127.0.0.1:$rw_port/storage/api/v2/write" 2>&1 | sed 's/^/  /'

if [ "${1:-}" = "--keep" ]; then
  start_vmagent
  echo "== vmagent scrapes and writes again; rwgate_* counters: http://127.0.0.1:$rw_port/metrics"
  echo "== running; rwgate on :$rw_port, Prometheus on :$prom_port, ClickHouse on :$ch_http. Ctrl-C to stop."
  wait
fi
