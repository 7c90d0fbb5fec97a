#!/usr/bin/env bash
# Cloud TPU VM launcher for cai-jax: create a TPU VM (or a queued resource), copy the working
# tree to every worker, install the package with jax[tpu], run the same cai-jax command on all
# workers (one process per host; jax.distributed finds the pod by itself), fetch the logs,
# delete the VM. Every step is one or more gcloud commands; --dry-run prints them instead.
# Examples: launch/README.md.
set -euo pipefail

readonly USAGE_LINE="usage: launch/tpu_vm.sh [OPTIONS] COMMAND [-- CAI_JAX_ARGS...]"

usage() {
  cat <<EOF
$USAGE_LINE

Commands:
  create          create the TPU VM (gcloud compute tpus tpu-vm create); with --queued a
                  queued resource instead (gcloud compute tpus queued-resources create)
  status          describe the TPU VM (with --queued: the queued resource)
  copy            tar the working tree (without runs/, .git, .venv, caches) and unpack it into
                  the remote directory of every worker
  install         on every worker: a virtual environment REMOTE_DIR/.venv (Python from
                  --python, installed with apt if missing), then pip install -e . 'jax[tpu]'
                  (setup.py has no tpu extra)
  run -- ARGS     on every worker: REMOTE_DIR/.venv/bin/cai-jax ARGS --distributed=auto
                  (unless ARGS set --distributed), output tee'd (appended) to
                  REMOTE_DIR/logs/LOG_NAME.\$(hostname).log on that worker; with --detach
                  started under nohup in the background (output only to the log)
  ssh -- CMD...   run a shell command (the words joined by spaces) on every worker, e.g.
                  ssh -- 'tail -n 3 cai_jax/logs/*.log'
  logs            copy REMOTE_DIR/logs/* of every worker into --log_dir
  delete          delete the TPU VM (with --queued: the queued resource and its VM)

Options (a flag, or the environment variable beside it; flags win):
  --name NAME           TPU_NAME         VM / queued-resource name (default cai-jax)
  --zone ZONE           TPU_ZONE         zone (default us-east5-a)
  --project PROJECT     TPU_PROJECT      Google Cloud project (default: gcloud's own)
  --accelerator TYPE    TPU_ACCELERATOR  accelerator type, e.g. v5p-8, v5p-256 (default v5p-8)
  --version RUNTIME     TPU_VERSION      TPU software version (default v2-alpha-tpuv5)
  --remote_dir DIR      TPU_REMOTE_DIR   working directory on the workers, relative to the
                                         home directory or absolute (default cai_jax)
  --worker W            TPU_WORKER       workers for copy / install / run / ssh / logs
                                         (default all)
  --python PY           TPU_PYTHON       interpreter of the virtual environment (default
                                         python3.11; the package needs Python >= 3.11)
  --log_name NAME       TPU_LOG_NAME     log file stem of run (default: the cai-jax command)
  --log_dir DIR         TPU_LOG_DIR      local destination of logs (default runs/tpu_logs/NAME
                                         in the repository)
  --queued              TPU_QUEUED=1     create / status / delete through queued resources
  --spot                TPU_SPOT=1       with --queued: a Spot queued resource
  --detach              TPU_DETACH=1     run: return once started; the run survives the
                                         ssh session (follow it with logs or ssh)
  --dry-run             DRY_RUN=1        print each command, one per line prefixed "+ ",
                                         instead of running it
  -h, --help            this text

Options may come before or after COMMAND; the arguments of run and ssh follow "--".
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  echo "$USAGE_LINE" >&2
  exit 2
}

# One word quoted for a POSIX shell: unchanged when it holds only safe characters, otherwise
# in single quotes (the same rule as Python's shlex.quote).
quote() {
  local s=$1 LC_ALL=C
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# All arguments quoted and joined with spaces.
join_quoted() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(quote "$a")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it as "+ WORD WORD ...".
run_cmd() {
  if [[ $dry_run == 1 ]]; then
    printf '+ %s\n' "$(join_quoted "$@")"
  else
    "$@"
  fi
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

name=${TPU_NAME:-cai-jax}
zone=${TPU_ZONE:-us-east5-a}
project=${TPU_PROJECT:-}
accelerator=${TPU_ACCELERATOR:-v5p-8}
version=${TPU_VERSION:-v2-alpha-tpuv5}
remote_dir=${TPU_REMOTE_DIR:-cai_jax}
worker=${TPU_WORKER:-all}
python=${TPU_PYTHON:-python3.11}
log_name=${TPU_LOG_NAME:-}
log_dir=${TPU_LOG_DIR:-}
queued=${TPU_QUEUED:-0}
spot=${TPU_SPOT:-0}
detach=${TPU_DETACH:-0}
dry_run=${DRY_RUN:-0}
command=""
cai_args=()

set_option() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --accelerator) accelerator=$2 ;;
    --version) version=$2 ;;
    --remote_dir) remote_dir=$2 ;;
    --worker) worker=$2 ;;
    --python) python=$2 ;;
    --log_name) log_name=$2 ;;
    --log_dir) log_dir=$2 ;;
    *) die "unknown option $1" ;;
  esac
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --)
      shift
      cai_args=("$@")
      break
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run | --dry_run) dry_run=1 ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --detach) detach=1 ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --name | --zone | --project | --accelerator | --version | --remote_dir | --worker | \
      --python | --log_name | --log_dir)
      [[ $# -ge 2 ]] || die "option $1 needs a value"
      set_option "$1" "$2"
      shift
      ;;
    -*) die "unknown option $1" ;;
    *)
      [[ -z $command ]] || die "unexpected argument '$1' (cai-jax arguments go after --)"
      command=$1
      ;;
  esac
  shift
done

[[ -n $command ]] || die "no command given"
[[ -n $name ]] || die "--name is empty"
[[ -n $zone ]] || die "--zone is empty"
[[ -n $remote_dir ]] || die "--remote_dir is empty"
if [[ $spot == 1 && $queued != 1 ]]; then
  die "--spot needs --queued"
fi
if [[ ${#cai_args[@]} -gt 0 && $command != run && $command != ssh ]]; then
  die "only run and ssh take arguments after --"
fi

# Location flags shared by every gcloud command.
where=(--zone="$zone")
if [[ -n $project ]]; then
  where+=(--project="$project")
fi
rdir=$(quote "$remote_dir")

# The same shell command on the chosen workers.
on_workers() {
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$worker" --command="$1"
}

cmd_create() {
  if [[ $queued == 1 ]]; then
    local extra=()
    if [[ $spot == 1 ]]; then
      extra=(--spot)
    fi
    run_cmd gcloud compute tpus queued-resources create "$name" "${where[@]}" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$version" ${extra[@]+"${extra[@]}"}
  else
    run_cmd gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
      --accelerator-type="$accelerator" --version="$version"
  fi
}

cmd_status() {
  if [[ $queued == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources describe "$name" "${where[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
  fi
}

cmd_copy() {
  local tarball="${TMPDIR:-/tmp}/cai_jax-$name.tar.gz"
  local remote_tar="cai_jax-src.tar.gz"
  run_cmd tar -czf "$tarball" --exclude=./runs --exclude=./.git --exclude=./.venv \
    --exclude=__pycache__ --exclude=./.pytest_cache --exclude='*.egg-info' -C "$repo" .
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_tar" "${where[@]}" \
    --worker="$worker"
  on_workers "mkdir -p $rdir && tar -xzf $remote_tar -C $rdir && rm $remote_tar"
  run_cmd rm -f "$tarball"
}

cmd_install() {
  local py
  py=$(quote "$python")
  on_workers "set -e; cd $rdir; $py -m venv .venv || { sudo apt-get -qq update && \
sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y $py $py-venv && \
$py -m venv --clear .venv; }; .venv/bin/python -m pip install -q -U pip; \
.venv/bin/python -m pip install -q -e . 'jax[tpu]'"
}

cmd_run() {
  [[ ${#cai_args[@]} -gt 0 ]] ||
    die "run needs the cai-jax arguments after --, e.g. run -- rl --gin_file=FILE"
  local args=("${cai_args[@]}") a distributed=0 stem
  for a in "${args[@]}"; do
    if [[ $a == --distributed || $a == --distributed=* ]]; then
      distributed=1
    fi
  done
  if [[ $distributed == 0 ]]; then
    args+=(--distributed=auto)
  fi
  stem=${log_name:-${cai_args[0]}}
  stem=${stem//[^A-Za-z0-9._=,+-]/_}
  local log="logs/$stem.\$(hostname).log"
  if [[ $detach == 1 ]]; then
    on_workers "cd $rdir && mkdir -p logs && nohup .venv/bin/cai-jax \
$(join_quoted "${args[@]}") >> $log 2>&1 < /dev/null &"
  else
    on_workers "set -o pipefail; cd $rdir && mkdir -p logs && .venv/bin/cai-jax \
$(join_quoted "${args[@]}") 2>&1 | tee -a $log"
  fi
}

cmd_ssh() {
  [[ ${#cai_args[@]} -gt 0 ]] || die "ssh needs a command after --"
  on_workers "${cai_args[*]}"
}

cmd_logs() {
  local dest=${log_dir:-$repo/runs/tpu_logs/$name}
  run_cmd mkdir -p "$dest"
  run_cmd gcloud compute tpus tpu-vm scp "$name:$remote_dir/logs/*" "$dest/" "${where[@]}" \
    --worker="$worker"
}

cmd_delete() {
  if [[ $queued == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

case $command in
  create) cmd_create ;;
  status) cmd_status ;;
  copy) cmd_copy ;;
  install) cmd_install ;;
  run) cmd_run ;;
  ssh) cmd_ssh ;;
  logs) cmd_logs ;;
  delete) cmd_delete ;;
  *) die "unknown command '$command' (create, status, copy, install, run, ssh, logs, delete)" ;;
esac
