#!/usr/bin/env bash
# Makes docs/jaeger-timed-out.png and docs/jaeger-nested.png from a real run: synspan exports
# to the test bed's Jaeger (synspan-jaeger: the real Jaeger UI over an in-memory store), curl
# in a network namespace of its own connects to a peer namespace that drops its SYNs, the
# kernel retransmits five times and gives up, and Chromium renders that attempt's trace page
# with its logs open. Then the test bed's synspan-traced, exporting its own spans to the same
# Jaeger, makes the same attempt inside its span `GET /checkout/0` from the same namespace:
# the second picture is that trace, the `tcp connect` span nested under the application's.
#   scripts/jaeger-screenshot.sh [OUTPUT_DIR]
# Traffic stays between the two namespaces this script creates; it removes them at exit.
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
dir=${1:-docs}
out=$dir/jaeger-timed-out.png
nested=$dir/jaeger-nested.png
scripts/setup.sh
scripts/setup-test.sh
cargo build --release --bins >&2

work=$(mktemp -d)
client=ss-shot-c-$$
server=ss-shot-s-$$
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    ip netns del "$client" 2>/dev/null || true
    ip netns del "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Waits up to 30 s for a file to contain a pattern.
wait_for() {
    for _ in $(seq 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "jaeger-screenshot: no '$2' in $1:" >&2
    cat "$1" >&2
    exit 1
}

target/release/synspan-jaeger 127.0.0.1:0 127.0.0.1:0 127.0.0.1:0 >"$work/jaeger" &
pids+=($!)
wait_for "$work/jaeger" '"ui"'
address() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/jaeger" "$1"; }
grpc=$(address grpc)
ui=$(address ui)

# Stacks off: the picture is about the retransmits, and stacks carry this machine's paths.
target/release/synspan --output none --otlp-endpoint "http://$grpc" --metrics-interval 0 \
    --no-stacks 2>"$work/synspan" &
pids+=($!)
wait_for "$work/synspan" 'synspan ready'

ip netns add "$client"
ip netns add "$server"
# synspan-traced's first connect, before any span, goes to its own loopback.
ip -n "$client" link set lo up
ip link add "shota$$" netns "$client" type veth peer name "shotb$$" netns "$server"
ip -n "$client" addr add 198.18.0.1/24 dev "shota$$"
ip -n "$server" addr add 198.18.0.100/24 dev "shotb$$"
ip -n "$client" link set "shota$$" up
ip -n "$server" link set "shotb$$" up
# 5 SYN retransmits, then the kernel gives up after about 7 s.
ip netns exec "$client" sysctl -q -w net.ipv4.tcp_syn_retries=2
ip netns exec "$server" iptables -w -A INPUT -p tcp --dport 443 --syn -j DROP

OTEL_SERVICE_NAME=checkout OTEL_RESOURCE_ATTRIBUTES=deployment.environment.name=production \
    ip netns exec "$client" curl -sS --max-time 30 -o /dev/null https://198.18.0.100/ 2>&1 |
    sed 's/^/curl: /' >&2 || true

trace=""
for _ in $(seq 100); do
    trace=$(curl -sf "http://$ui/api/traces?service=checkout&limit=1" |
        python3 -c "import json,sys; d=json.load(sys.stdin)['data']; print(d[0]['traceID'] if d else '')")
    [ -n "$trace" ] && break
    sleep 0.1
done
[ -n "$trace" ] || { echo "jaeger-screenshot: no trace of service checkout" >&2; cat "$work/synspan" >&2; exit 1; }

mkdir -p "$dir"
node testbed/jaeger_ui/trace_page.mjs "http://$ui/trace/$trace" "$out" >/dev/null
echo "jaeger-screenshot: $out (trace $trace)" >&2

# Reads one line of synspan-traced's output (60 s at most) into $line.
traced_line() {
    read -r -t 60 line <&"${traced[0]}" || { echo "jaeger-screenshot: synspan-traced said nothing" >&2; exit 1; }
}
coproc traced { exec target/release/synspan-traced --service checkout --otlp-endpoint "http://$grpc" \
    --netns "$client" --targets 198.18.0.100:443; }
pids+=("$traced_PID")
traced_line
wait_for "$work/synspan" "process $traced_PID publishes its thread context"
echo go >&"${traced[1]}"
traced_line
own=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['trace_id'])" "$line")
traced_line
[ "$line" = '{"flushed":true}' ] || { echo "jaeger-screenshot: synspan-traced said $line" >&2; exit 1; }
for _ in $(seq 100); do
    spans=$(curl -sf "http://$ui/api/traces/$own" |
        python3 -c "import json,sys; print(len(json.load(sys.stdin)['data'][0]['spans']))" || true)
    [ "$spans" = 2 ] && break
    sleep 0.1
done
[ "$spans" = 2 ] || { echo "jaeger-screenshot: trace $own has ${spans:-no} spans, not 2" >&2; cat "$work/synspan" >&2; exit 1; }
node testbed/jaeger_ui/trace_page.mjs "http://$ui/trace/$own" "$nested" >/dev/null
echo "jaeger-screenshot: $nested (trace $own)" >&2
