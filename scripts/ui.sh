#!/usr/bin/env bash
# Local UIs for the current project folder, on 127.0.0.1 only:
#   scripts/ui.sh start   Prefect server (UI + API; PREFECT_HOME .imgflow/prefect, the home `imgflow`
#                         runs use when no Prefect is configured) and MLflow server (sqlite
#                         .imgflow/mlflow.db, artifacts under .imgflow/mlartifacts); prints both URLs
#   scripts/ui.sh stop    stops exactly the processes `start` recorded (PIDs in .imgflow/ui/pids)
#   scripts/ui.sh status
# Ports: PREFECT_PORT (default 4200), MLFLOW_PORT (default 5000). `make ui` / `make ui-stop` call this.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=${IMGFLOW_BIN:-$HERE/../.venv/bin}
STATE=${IMGFLOW_STATE_DIR:-.imgflow}
UI=$STATE/ui
PIDS=$UI/pids
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

port_free() {
  "$BIN/python" - "$1" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

wait_healthy() {  # name url pid
  for _ in $(seq 1 180); do
    if "$BIN/python" -c "import httpx,sys; sys.exit(httpx.get('$2', timeout=2).status_code != 200)" 2>/dev/null; then
      return 0
    fi
    alive "$3" || { echo "ui: $1 exited; see $UI/$1.log" >&2; return 1; }
    sleep 1
  done
  echo "ui: $1 not healthy after 180 s; see $UI/$1.log" >&2
  return 1
}

start() {
  if [[ -s $PIDS ]]; then
    while read -r name pid; do
      if alive "$pid"; then echo "ui: already running ($name pid $pid); scripts/ui.sh stop first" >&2; exit 1; fi
    done < "$PIDS"
  fi
  for port in "$PREFECT_PORT" "$MLFLOW_PORT"; do
    port_free "$port" || { echo "ui: 127.0.0.1:$port is taken; set PREFECT_PORT / MLFLOW_PORT" >&2; exit 1; }
  done
  mkdir -p "$UI" "$STATE/mlartifacts"
  : > "$PIDS"
  # setsid: each server leads its own process group, so `stop` can end it with its children.
  # The project's one Prefect home: `imgflow pipeline` run without a server writes its history there too.
  export PREFECT_HOME=${PREFECT_HOME:-$STATE/prefect}
  # A new home's / store's database is made from the schema imgflow ships, not migrated (flows/prefect_home.py,
  # components/registry/store_schema.py); without it the servers create their own, as before.
  [[ -e "$PREFECT_HOME/prefect.db" ]] || "$BIN/python" -m flows.prefect_home seed > /dev/null || true
  setsid "$BIN/prefect" server start \
    --host 127.0.0.1 --port "$PREFECT_PORT" > "$UI/prefect.log" 2>&1 < /dev/null &
  echo "prefect $!" >> "$PIDS"
  [[ -e "$STATE/mlflow.db" ]] \
    || "$BIN/python" -m components.registry.store_schema seed "sqlite:///$(cd "$STATE" && pwd)/mlflow.db" > /dev/null || true
  setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$(cd "$STATE" && pwd)/mlflow.db" \
    --artifacts-destination "$(cd "$STATE/mlartifacts" && pwd)" > "$UI/mlflow.log" 2>&1 < /dev/null &
  echo "mlflow $!" >> "$PIDS"
  local prefect_pid mlflow_pid
  prefect_pid=$(awk '$1=="prefect"{print $2}' "$PIDS"); mlflow_pid=$(awk '$1=="mlflow"{print $2}' "$PIDS")
  wait_healthy prefect "http://127.0.0.1:$PREFECT_PORT/api/health" "$prefect_pid" || { stop; exit 1; }
  wait_healthy mlflow "http://127.0.0.1:$MLFLOW_PORT/health" "$mlflow_pid" || { stop; exit 1; }
  # While this server runs, imgflow commands in this folder report to it (flows/environment.py).
  echo "http://127.0.0.1:$PREFECT_PORT/api" > "$UI/prefect_api_url"
  cat <<MSG
Prefect UI   http://127.0.0.1:$PREFECT_PORT   (export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api)
MLflow UI    http://127.0.0.1:$MLFLOW_PORT   (export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT)
PIDs in $PIDS; stop with: make ui-stop
MSG
}

stop() {
  [[ -s $PIDS ]] || { echo "ui: nothing recorded in $PIDS"; return 0; }
  while read -r name pid; do
    if alive "$pid"; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      for _ in $(seq 1 30); do alive "$pid" || break; sleep 0.5; done
      alive "$pid" && kill -KILL -- "-$pid" 2>/dev/null
      echo "stopped $name (pid $pid)"
    fi
  done < "$PIDS"
  rm -f "$PIDS" "$UI/prefect_api_url"
}

status() {
  [[ -s $PIDS ]] || { echo "not running"; return 0; }
  while read -r name pid; do
    if alive "$pid"; then echo "$name running (pid $pid)"; else echo "$name not running (pid $pid)"; fi
  done < "$PIDS"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
