# Sourced first by the scripts that load eBPF programs (`. "$(dirname "$0")/as-root.sh"`):
# not root, they run again through sudo where there is one, else stop and say why.
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -- "$0" "$@"
    fi
    echo "$(basename "$0"): needs root (it loads eBPF programs and creates network namespaces); run it as root" >&2
    exit 1
fi
