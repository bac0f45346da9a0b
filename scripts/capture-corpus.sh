#!/usr/bin/env bash
# Captures real Remote-Write 1.0 bodies, as sent, for the fuzzer's seeds
# (src/fuzz/inputs.rs): Prometheus and vmagent each scrape Prometheus's own
# /metrics every second and remote-write to a small capture server, which
# keeps the first COUNT bodies of each as OUT/prometheus-NNN.snappy and
# OUT/vmagent-NNN.snappy.
#
#   bash scripts/capture-corpus.sh [OUT] [COUNT] [SAMPLES_PER_SEND]
#
# Defaults: target/fuzz-corpus, 8 bodies, 500 samples per body (pass the
# directory to the runner: --corpus target/fuzz-corpus). The committed
# fixtures (tests/fixtures/fuzz/, read by every run) were made with
#   bash scripts/capture-corpus.sh tests/fixtures/fuzz 2 40
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/fuzz-corpus}
count=${2:-8}
per_send=${3:-500}
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # vmagent writes its queue's state as it stops: wait before removing it.
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
prom_port=$(free_port)
sink_port=$(free_port)
vm_port=$(free_port)

mkdir -p "$out"
rm -f "$out"/prometheus-*.snappy "$out"/vmagent-*.snappy
python3 - "$sink_port" "$out" "$count" <<'PY' &
import http.server, os, sys
port, out, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seen = {"prometheus": 0, "vmagent": 0}
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        who = self.path.strip("/").split("/")[0]
        if who in seen and seen[who] < count and self.headers.get("Content-Encoding") == "snappy":
            with open(os.path.join(out, "%s-%03d.snappy" % (who, seen[who])), "wb") as f:
                f.write(body)
            seen[who] += 1
        self.send_response(204)
        self.end_headers()
        if all(n >= count for n in seen.values()):
            os._exit(0)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
PY
sink=$!
pids+=("$sink")

cat > "$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$prom_port"]
remote_write:
  - url: http://127.0.0.1:$sink_port/prometheus/api/v1/write
    queue_config: {batch_send_deadline: 1s, max_samples_per_send: $per_send}
YML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="127.0.0.1:$prom_port" --log.level=warn &
pids+=("$!")

cat > "$work/scrape.yml" <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: vmagent
    static_configs:
      - targets: ["127.0.0.1:$prom_port"]
YML
vmagent -httpListenAddr="127.0.0.1:$vm_port" -promscrape.config="$work/scrape.yml" \
    -remoteWrite.url="http://127.0.0.1:$sink_port/vmagent/api/v1/write" \
    -remoteWrite.tmpDataPath="$work/vmagent" -remoteWrite.flushInterval=1s \
    -remoteWrite.maxRowsPerBlock="$per_send" -loggerLevel=WARN &
pids+=("$!")

# Bounded wait for the capture server to have its bodies.
for _ in $(seq 240); do
    kill -0 "$sink" 2>/dev/null || break
    sleep 0.5
done
if kill -0 "$sink" 2>/dev/null; then
    echo "capture-corpus: not every body arrived within 120 s" >&2
    exit 1
fi
ls -l "$out"
