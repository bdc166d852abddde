#!/bin/sh
# The `payments` dependency: a listening server whose SYNs are dropped before they reach it.
# The listener is there so that it is the rule, not a missing server, that makes the connect
# time out (without the rule the port would answer). Needs CAP_NET_ADMIN in its own network
# namespace only: the rule never touches the host's firewall.
set -eu
PORT="${PORT:-8080}"
iptables -C INPUT -p tcp --dport "$PORT" --syn -j DROP 2>/dev/null \
    || iptables -A INPUT -p tcp --dport "$PORT" --syn -j DROP
exec python3 /app/server.py
