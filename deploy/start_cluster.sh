#!/usr/bin/env bash
# A Ray cluster for vapo, and a run on it.
#
#   deploy/start_cluster.sh head   [--port 6379] [--num-cpus N] [--num-gpus N] [--resource NAME=N]...
#                                  [--dashboard] [--dashboard-port P] [--client-port P] [--node-ip IP] [-- RAY_ARGS]
#   deploy/start_cluster.sh worker ADDRESS [--num-cpus N] [--num-gpus N] [--resource NAME=N]... [-- RAY_ARGS]
#   deploy/start_cluster.sh submit [--address A] [--wait S] CONFIG... [key=value ...]
#   deploy/start_cluster.sh scale N [--address A]
#   deploy/start_cluster.sh status [--address A] [--json]
#   deploy/start_cluster.sh stop [--grace S]       (S: the driver's time to exit; Ray's processes get S/3)
#
# `head` starts a Ray head on this machine, `worker ADDRESS` joins this machine to it as another node with
# its own CPUs, GPUs and custom resources (`--resource actor_node=2`: a label that `deploy.actor_resources`
# or `deploy.learner_resources` asks for, so actors or learner ranks are placed on the nodes that have it).
# The number of actors (`actors.num_actors`, later `scale N`) and the learner's size (`learner.num_ranks`)
# are set independently. The dashboard is off by default (several processes; `--dashboard` turns it on).
#
# How `submit` runs the job. verl and OpenRLHF users know two ways: `ray job submit -- python -m ...`
# (the driver runs under the dashboard's job server) and running the trainer on the head node attached
# to the cluster. `ray job submit` needs the dashboard, which is off here by default, so `submit` runs
# the driver attached to the cluster: `vapo train CONFIG ... deploy.ray_address=ADDRESS` in its own
# session (setsid + nohup, so it survives the terminal closing), logging to RUN_DIR/driver.log, its pid
# kept in the state directory for `status` and `stop`. It waits until the job's processes are placed
# (the driver prints `running: ...`) or the driver failed, and then shows that line or the error.
# With `head --dashboard`, `ray job submit --address http://HEAD:8265 -- vapo train CONFIG
# deploy.ray_address=auto` works as well (the job server then owns the driver and its log).
#
# State: $VAPO_CLUSTER_DIR (default /tmp/vapo-cluster-UID; keep it short: Ray's socket paths live under
# it) holds `address` (the head's GCS address, read by the other sub-commands), `nodes` (the Ray temp dir
# of each node started on this machine), `job` (the driver's pid and log) and each node's Ray temp dir.
# `stop` stops the driver (SIGTERM first: it may checkpoint) and then only the Ray processes of the
# nodes listed in `nodes` (found by their temp dir: `ray stop` would stop every Ray instance of the
# machine). Run it on each machine that started a node.
#
# Auth: Ray's token auth is on (RAY_AUTH_MODE=token unless set; a token is made in ~/.ray/auth_token when
# missing); copy that file to the other machines before `worker`.
#
# The script only parses arguments and calls `ray start` and `vapo ...`; what needs Ray is in
# deploy/launch.py (`vapo status`, `vapo scale`) and the process bookkeeping in deploy/cluster.py.
set -euo pipefail

STATE=${VAPO_CLUSTER_DIR:-/tmp/vapo-cluster-$(id -u)}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if command -v vapo >/dev/null 2>&1; then VAPO=(vapo); else VAPO=(python3 -m deploy.cli); fi

die() { echo "start_cluster.sh: $*" >&2; exit 2; }
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

listening() {  # host:port -> true when something accepts connections there
  local host=${1%:*} port=${1##*:}
  timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

cluster_address() {  # --address, else the one `head`/`worker` wrote
  if [[ -n ${1:-} ]]; then echo "$1"; return; fi
  [[ -s $STATE/address ]] || die "no cluster address: run '$0 head' (or 'worker ADDRESS') first, or pass --address"
  cat "$STATE/address"
}

driver_pid() {  # the running driver's pid, or nothing
  [[ -s $STATE/job ]] || return 0
  local pid
  pid=$(sed -n 's/^pid=//p' "$STATE/job")
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

RAY_ARGS=() RESOURCES=() PASS=()
node_option() {  # OPTION VALUE: an option both head and worker take -> RAY_ARGS / RESOURCES
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case $1 in
    --num-cpus|--num-gpus) RAY_ARGS+=("$1" "$2") ;;
    --resource)
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_.-]*=[0-9.]+$ ]] || die "--resource wants NAME=AMOUNT, got '$2'"
      RESOURCES+=("\"${2%%=*}\": ${2#*=}") ;;
    *) die "unknown option '$1'" ;;
  esac
}

resources_json() {  # RESOURCES -> the JSON that `ray start --resources` takes
  local IFS=,
  echo "{${RESOURCES[*]}}"
}

start_node() {  # TEMP_DIR LOG ray-start-args...: start a node, remember its temp dir for `stop`
  local temp=$1 log=$2; shift 2
  mkdir -p "$temp"
  echo "$temp" >>"$STATE/nodes"
  if ! ray start --temp-dir "$temp" --disable-usage-stats "$@" >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    die "ray start failed (full log: $log)"
  fi
}

cmd_head() {
  local port=6379 dashboard=false
  while (($#)); do
    case $1 in
      --port) port=${2:?--port needs a value}; shift 2 ;;
      --dashboard) dashboard=true; shift ;;
      --dashboard-port) RAY_ARGS+=(--dashboard-port "${2:?$1 needs a value}"); shift 2 ;;
      --client-port) RAY_ARGS+=(--ray-client-server-port "${2:?$1 needs a value}"); shift 2 ;;
      --node-ip) RAY_ARGS+=(--node-ip-address "${2:?$1 needs a value}"); shift 2 ;;
      --) shift; PASS=("$@"); break ;;
      *) node_option "$@"; shift 2 ;;
    esac
  done
  if [[ -s $STATE/address ]] && listening "$(cat "$STATE/address")"; then
    die "a head started here already runs at $(cat "$STATE/address"); '$0 stop' first"
  fi
  if listening "127.0.0.1:$port"; then die "port $port is in use (pass --port)"; fi
  ((${#RESOURCES[@]})) && RAY_ARGS+=(--resources "$(resources_json)")
  if [[ $RAY_AUTH_MODE == token ]]; then ray get-auth-token --generate >/dev/null; fi
  mkdir -p "$STATE"
  start_node "$STATE/head" "$STATE/head.log" --head --port "$port" --include-dashboard="$dashboard" \
    "${RAY_ARGS[@]}" "${PASS[@]}"
  cp "$STATE/head/ray_current_cluster" "$STATE/address"
  echo "head: $(cat "$STATE/address")"
  echo "join another node: $0 worker $(cat "$STATE/address") --num-cpus N --resource actor_node=N"
}

cmd_worker() {
  local address=${1:-}
  [[ $address == *:* ]] || die "worker wants the head's ADDRESS (host:port)"
  shift
  while (($#)); do
    case $1 in
      --) shift; PASS=("$@"); break ;;
      *) node_option "$@"; shift 2 ;;
    esac
  done
  listening "$address" || die "no Ray cluster at $address (nothing listens there)"
  ((${#RESOURCES[@]})) && RAY_ARGS+=(--resources "$(resources_json)")
  mkdir -p "$STATE"
  local temp
  temp=$(mktemp -d "$STATE/w.XXXX")
  start_node "$temp" "$temp.log" --address "$address" "${RAY_ARGS[@]}" "${PASS[@]}"
  [[ -s $STATE/address ]] || echo "$address" >"$STATE/address"
  echo "joined $address (temp dir $temp)"
}

cmd_submit() {
  local address="" wait_s=300
  while (($#)); do
    case $1 in
      --address) address=${2:?}; shift 2 ;;
      --wait) wait_s=${2:?}; shift 2 ;;
      *) break ;;
    esac
  done
  (($#)) || die "submit wants CONFIG [key=value ...]"
  address=$(cluster_address "$address")
  local pid
  pid=$(driver_pid)
  [[ -z $pid ]] || die "a job is already running (driver pid $pid); '$0 scale N' or '$0 stop'"
  local args=("$@" "deploy.ray_address=$address") run_dir log
  run_dir=$("${VAPO[@]}" config --get run_dir "${args[@]}")  # also validates the whole config, in one line
  mkdir -p "$run_dir"
  log="$(cd "$run_dir" && pwd)/driver.log"
  touch "$log"
  local start
  start=$(($(wc -l <"$log") + 1))
  PYTHONUNBUFFERED=1 setsid nohup "${VAPO[@]}" train "${args[@]}" >>"$log" 2>&1 </dev/null &
  pid=$!
  printf 'pid=%s\nlog=%s\naddress=%s\n' "$pid" "$log" "$address" >"$STATE/job"
  for ((t = 0; t < wait_s; t++)); do
    if tail -n +"$start" "$log" | grep -m1 '^running: '; then
      echo "submitted: driver pid $pid, log $log"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then  # the driver's one-line error, else the end of its log
      local err
      err=$(tail -n +"$start" "$log" | grep -m1 '^vapo train: ' || true)
      [[ -n $err ]] || { tail -n 20 "$log" >&2; err="the job failed to start"; }
      die "$err (log: $log)"
    fi
    sleep 1
  done
  echo "driver pid $pid is still starting after ${wait_s}s; follow $log"
}

cmd_scale() {
  local n=${1:-} address=""
  [[ $n =~ ^[0-9]+$ ]] || die "scale wants the number of actors"
  shift
  [[ ${1:-} == --address ]] && address=${2:?}
  address=$(cluster_address "$address")
  "${VAPO[@]}" scale "$n" --address "$address"
}

cmd_status() {
  local address="" json=()
  while (($#)); do
    case $1 in
      --address) address=${2:?}; shift 2 ;;
      --json) json=(--json); shift ;;
      *) die "unknown option '$1'" ;;
    esac
  done
  address=$(cluster_address "$address")
  "${VAPO[@]}" status --address "$address" "${json[@]}"
  ((${#json[@]})) && return 0
  [[ -s $STATE/job ]] || return 0
  local pid log
  pid=$(driver_pid)
  log=$(sed -n 's/^log=//p' "$STATE/job")
  if [[ -n $pid ]]; then echo "driver: pid $pid running, log $log"; else echo "driver: not running, log $log"; fi
  grep '^step ' "$log" 2>/dev/null | tail -n 1 | sed 's/^/  last: /' || true
}

cmd_stop() {
  local grace=30
  [[ ${1:-} == --grace ]] && grace=${2:?}
  local pid nodes=() address=()
  pid=$(driver_pid)
  [[ -s $STATE/nodes ]] && mapfile -t nodes <"$STATE/nodes"
  [[ -s $STATE/address ]] && address=(--address "$(cat "$STATE/address")")
  if [[ -z $pid && ${#nodes[@]} -eq 0 ]]; then
    echo "nothing to stop (state: $STATE)"
    return 0
  fi
  if ((${#nodes[@]})); then
    "${VAPO[@]}" stop-nodes "${nodes[@]}" "${address[@]}" ${pid:+--driver-pid "$pid"} --grace "$grace"
  else
    kill -TERM "$pid" && timeout "$grace" tail --pid="$pid" -f /dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/address" "$STATE/nodes" "$STATE/job"
}

command=${1:-}
(($#)) && shift
case $command in
  head) cmd_head "$@" ;;
  worker) cmd_worker "$@" ;;
  submit) cmd_submit "$@" ;;
  scale) cmd_scale "$@" ;;
  status) cmd_status "$@" ;;
  stop) cmd_stop "$@" ;;
  *) usage ;;
esac
