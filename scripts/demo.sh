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
vmagent -httpListenAddr="127.0.0.1:$vm_port" -promscrape.config="$work/scrape.yml" \
  -remoteWrite.url="http://127.0.0.1:$rw_port/storage/api/v2/write" \
  -remoteWrite.headers="Cloud-Account-Id: $ACCOUNT" \
  -remoteWrite.basicAuth.username=demo -remoteWrite.basicAuth.password=s3cret \
  -remoteWrite.tmpDataPath="$work/vmagent" -remoteWrite.flushInterval=1s \
  >"$work/vmagent.log" 2>&1 &
pids+=($!)

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
echo "   that claimed to be $OTHER; go_goroutines and prometheus_http_requests_total were"
echo "   dropped by the allowlist."
echo
echo "== rwgate's own counters:"
curl -fsS "http://127.0.0.1:$rw_port/metrics" | grep -E '^rwgate_(samples_(received|forwarded|dropped)_total|requests_total)' | sed 's/^/  /'
echo
echo "== waiting for the tee: raw samples in ClickHouse and a rollup pass"
for _ in $(seq 1 60); do
  n=$(ch "SELECT count() FROM expenses" 2>/dev/null || echo 0)
  [ "${n:-0}" -ge 2 ] && break
  sleep 0.5
done
sleep 3   # a few more scrapes, so the rows below have grown past the first sample
echo
echo "== raw cost samples kept (kubecost_samples FINAL), per series:"
ch "SELECT metric, namespace, count() AS samples, min(value) AS rate_usd_per_h
    FROM kubecost_samples FINAL GROUP BY metric, namespace ORDER BY namespace
    FORMAT PrettyCompactNoEscapes" | sed 's/^/  /'
echo
echo "== expense rows, read the way the platform REST API reads them"
echo "   (SUM(cost * sign) ... HAVING SUM(sign) > 0, never FINAL):"
ch "SELECT cloud_account_id, resource_id, k8s_namespace, date, SUM(cost * sign) AS cost
    FROM expenses GROUP BY cloud_account_id, resource_id, k8s_namespace, date
    HAVING SUM(sign) > 0 ORDER BY resource_id FORMAT PrettyCompactNoEscapes" | sed 's/^/  /'
echo "   The first sample of a namespace is charged the nominal 60 s step, each later"
echo "   one the time since the previous sample (2 s here): rate * dt / 3600 USD."
echo
echo "== a request without credentials is refused as diproxy did:"
curl -sS -o /dev/stderr -w '  HTTP %{http_code}\n' -X POST -H "Cloud-Account-Id: $ACCOUNT" \
  -H 'Content-Type: application/x-protobuf' -H 'Content-Encoding: snappy' \
  --data-binary x "http://127.0.0.1:$rw_port/storage/api/v2/write" 2>&1 | sed 's/^/  /'

if [ "${1:-}" = "--keep" ]; then
  echo "== running; rwgate on :$rw_port, Prometheus on :$prom_port, ClickHouse on :$ch_http. Ctrl-C to stop."
  wait
fi
