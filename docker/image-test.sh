#!/usr/bin/env bash
# `make image-test`: build the image from docker/Dockerfile on a CPU machine with no registry, and check, in the
# container, the contract of the bare job: non-root (uid 1000), read-only root filesystem, the image's volumes
# mounted from host folders, no network at run time, dumb-init as PID 1, exit 75 and a complete checkpoint on
# SIGTERM, a resume that finishes, a rerun that trains nothing, an export another uid can read.
#
# What it does, in order (its figures: the JSON line it prints; k8s/README.md has those of a 2-core machine):
#  1. a container engine: ENGINE (podman, the default, or docker), installed from Debian packages if missing;
#  2. a local base image (Debian bookworm minbase + python3 + venv, made by mmdebstrap from the mirror apt uses),
#     made once and cached in CACHE (a tarball) and in the engine's storage;
#  3. a wheelhouse image holding the CPU torch wheel(s) of WHEELS, so torch comes from there (build argument);
#  4. `make build` with the CPU build arguments -> IMAGE (localhost/bloom-zh-job:test);
#  5. the runs, every one with --network none, --read-only, --user 1000:1000 and host folders at /output, /cache,
#     /data and /models (the last two read-only): doctor, a quickstart training + smoke, a stop mid-training
#     (exit 75 + complete checkpoint), the resume, a third run that trains nothing, smoke as another uid.
# BUILD=no skips 2-4 and runs IMAGE as it is in the engine's storage (the release workflow: the image it pushed,
# by digest, before any tag moves to it).
# Exit 0 only if all hold; the last line of stdout is one JSON object with the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-podman}
IMAGE=${IMAGE:-localhost/bloom-zh-job:test}
BUILD=${BUILD:-yes}                          # no: test IMAGE as it is (steps 2-4 skipped)
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bloom-zh-job}
WORK=${WORK:-$CACHE/image-test}              # host folders mounted as the image's volumes (emptied first)
WHEELS=${WHEELS:-/opt/wheels}                # a folder with torch-<TORCH_VERSION>+cpu-*.whl (else downloaded)
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile)}
QUICK_STEPS=${QUICK_STEPS:-40}               # the quickstart training
STOP_STEPS=${STOP_STEPS:-100}                # the run that is stopped, then resumed
STOP_AFTER_STEP=${STOP_AFTER_STEP:-20}       # stop once metrics.jsonl has logged this step
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
BASE=localhost/bloom-zh-base:bookworm
BASE_PACKAGES=python3,python3-venv,passwd,ca-certificates
WHEELHOUSE=localhost/bloom-zh-wheelhouse:torch-$TORCH_VERSION

t0=$SECONDS
log() { printf '[image-test %4ds] %s\n' $((SECONDS - t0)) "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# ------------------------------------------------------------------ 1. the engine
apt_install() {
  [ "$(id -u)" = 0 ] || die "$ENGINE or mmdebstrap missing, and installing them needs root: apt-get install $*"
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" > /dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" > /dev/null; }
}
case "$ENGINE" in
  podman)
    command -v podman > /dev/null || apt_install podman runc uidmap
    ENG=(podman)
    # crun on this kernel: "cgroups in hybrid mode not supported"; runc works everywhere podman does.
    command -v runc > /dev/null && ENG+=(--runtime runc)
    RUN_EXTRA=()   # podman's --read-only mounts tmpfs on /tmp, /var/tmp and /run itself
    ;;
  docker)
    # Debian's client (/usr/bin/docker) first: another one earlier in PATH may lack what the build uses.
    [ -x /usr/bin/docker ] || apt_install docker.io
    ENG=(/usr/bin/docker)
    if ! "${ENG[@]}" info > /dev/null 2>&1; then
      log "starting dockerd (no iptables, no bridge: every run here is --network none or host)"
      (dockerd --iptables=false --bridge=none > "$CACHE/dockerd.log" 2>&1 &)
      for _ in $(seq 60); do "${ENG[@]}" info > /dev/null 2>&1 && break; sleep 1; done
      "${ENG[@]}" info > /dev/null 2>&1 || die "dockerd did not start: $CACHE/dockerd.log"
    fi
    export DOCKER_BUILDKIT=1
    RUN_EXTRA=(--tmpfs /tmp:rw,mode=1777)
    ;;
  *) die "ENGINE=$ENGINE: podman or docker" ;;
esac
mkdir -p "$CACHE"
# Explicit limits, within this shell's hard limits: the engine's defaults (or `host`) can exceed what a process
# in a container may set, and runc's setrlimit then fails with "operation not permitted".
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576; [ "$nofile" -gt 65536 ] && nofile=65536
ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

case "$BUILD" in yes|no) ;; *) die "BUILD=$BUILD: yes or no" ;; esac
build_s=0
if [ "$BUILD" = yes ]; then
# ------------------------------------------------------------------ 2. the local base (once)
if ! "${ENG[@]}" image exists "$BASE" 2> /dev/null && ! "${ENG[@]}" image inspect "$BASE" > /dev/null 2>&1; then
  tarball=$CACHE/base-bookworm-$(echo "$BASE_PACKAGES" | cksum | cut -d' ' -f1).tar
  if [ ! -s "$tarball" ]; then
    command -v mmdebstrap > /dev/null || apt_install mmdebstrap debian-archive-keyring
    mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Codename: bookworm' 'Component: main' 2> /dev/null \
      | grep -v security | head -1)
    mirror=${mirror:-http://deb.debian.org/debian/}
    log "making the base: mmdebstrap bookworm from $mirror -> $tarball"
    # (the format follows the file name: it must end in .tar)
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg  # on a non-Debian host (Ubuntu CI runners)
    signed=$([ -s "$keyring" ] && echo "[signed-by=$keyring] ")
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" bookworm "${tarball%.tar}.part.tar" \
      "deb $signed$mirror bookworm main"
    mv "${tarball%.tar}.part.tar" "$tarball"
  fi
  "${ENG[@]}" import "$tarball" "$BASE" > /dev/null
  log "imported $tarball as $BASE"
fi

# ------------------------------------------------------------------ 3. the wheelhouse (torch's CPU build)
torch_wheels=("$WHEELS"/torch-"$TORCH_VERSION"+cpu-*.whl)
if [ ! -e "${torch_wheels[0]}" ]; then  # no local wheel: PyTorch's CPU index (the wheel for the base's Python)
  log "no torch-$TORCH_VERSION+cpu wheel in WHEELS=$WHEELS: downloading it from $TORCH_CPU_INDEX"
  python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --index-url "$TORCH_CPU_INDEX" -d "$CACHE/wheels" "torch==$TORCH_VERSION+cpu" || die "no CPU torch wheel"
  torch_wheels=("$CACHE/wheels"/torch-"$TORCH_VERSION"+cpu-*.whl)
fi
wh_context=$CACHE/wheelhouse-context
rm -rf "$wh_context" && mkdir -p "$wh_context"
ln "${torch_wheels[@]}" "$wh_context/" 2> /dev/null || cp "${torch_wheels[@]}" "$wh_context/"
printf 'FROM scratch\nCOPY *.whl /\n' > "$wh_context/Containerfile"
"${ENG[@]}" build -q -f "$wh_context/Containerfile" -t "$WHEELHOUSE" "$wh_context" > /dev/null
rm -rf "$wh_context"

# ------------------------------------------------------------------ 4. the image, as `make build` builds it
secret=()
cert=${PIP_CERT:-}
[ -n "$cert" ] && [ -s "$cert" ] && secret=(PIP_CERT_FILE="$cert")
log "building $IMAGE (make build ENGINE=$ENGINE, CPU arguments)"
build_t=$SECONDS
make --no-print-directory build ENGINE="${ENG[0]}" IMAGE="${IMAGE%:*}" TAG="${IMAGE##*:}" BASE_IMAGE="$BASE" \
  TORCH_INDEX_URL= TORCH_CUDA=no WHEELHOUSE_IMAGE="$WHEELHOUSE" BUILD_NETWORK=host "${secret[@]}" \
  BUILD_OPTS="${ULIMITS[*]}" >&2
build_s=$((SECONDS - build_t))
fi
size=$("${ENG[@]}" image inspect --format '{{.Size}}' "$IMAGE") || die "no image $IMAGE in $ENGINE's storage"
log "$IMAGE: built in ${build_s}s (BUILD=$BUILD), $((size / 1000000)) MB"

# The image's own claims, from its configuration.
user=$("${ENG[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
entry=$("${ENG[@]}" image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")
[ "$user" = 1000:1000 ] || die "image user is '$user', not 1000:1000"
[[ "$entry" == '["dumb-init",'* ]] || die "entrypoint $entry does not start with dumb-init"

# BUILD_ONLY=1 (make cluster-test): the image, built and checked as above, without the runs below.
if [ "${BUILD_ONLY:-0}" = 1 ]; then log "built $IMAGE; BUILD_ONLY=1: no runs"; exit 0; fi

# ------------------------------------------------------------------ 5. the runs
rm -rf "$WORK" && mkdir -p "$WORK"/{output,cache,data,models}
chown 1000:1000 "$WORK/output" "$WORK/cache"
run_opts=(--network none --read-only --user 1000:1000 --shm-size 256m "${ULIMITS[@]}" "${RUN_EXTRA[@]}"
  -v "$WORK/output:/output" -v "$WORK/cache:/cache" -v "$WORK/data:/data:ro" -v "$WORK/models:/models:ro")
# run NAME ARGS...: one foreground run, its output in $WORK/NAME.log; prints the exit code.
run() {
  local name=$1 rc=0
  shift
  timeout "$RUN_TIMEOUT" "${ENG[@]}" run --rm --name "bloom-zh-image-test-$name" "${run_opts[@]}" "$IMAGE" "$@" \
    > "$WORK/$name.log" 2>&1 || rc=$?
  echo "$rc"
}
expect() {  # expect NAME RC WANT [TEXT]: RC must be WANT, and TEXT in NAME's log
  [ "$2" = "$3" ] || { tail -30 "$WORK/$1.log" >&2; die "$1 exited $2, expected $3 (log: $WORK/$1.log)"; }
  [ -z "${4:-}" ] || grep -qF -- "$4" "$WORK/$1.log" || { tail -30 "$WORK/$1.log" >&2; die "$1: no '$4' in $WORK/$1.log"; }
  log "$1: exit $2 ok"
}
complete_checkpoints() { find "$1" -maxdepth 2 -path '*/checkpoint-*/COMPLETE' -printf '%h\n' 2> /dev/null | sort -V; }
step_of() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["global_step"])' "$1/trainer_state.json"; }

quick=(--config quickstart --output-dir /output/quick --max-steps "$QUICK_STEPS" --save-steps 20 --resume auto)
rc=$(run doctor doctor "${quick[@]}"); expect doctor "$rc" 0
train_t=$SECONDS
rc=$(run train train "${quick[@]}"); expect train "$rc" 0 "done:"
train_s=$((SECONDS - train_t))
rc=$(run smoke smoke --model /output/quick/final); expect smoke "$rc" 0
quick_step=$(step_of "$(complete_checkpoints "$WORK/output/quick" | tail -1)")
[ "$quick_step" = "$QUICK_STEPS" ] || die "the quickstart's last checkpoint is at step '$quick_step', not $QUICK_STEPS"

# The stop: SIGTERM to PID 1 (dumb-init), as `kubectl delete` / a preemption does, in the middle of training.
stop=(train --config quickstart --output-dir /output/stop --max-steps "$STOP_STEPS" --save-steps 1000
  --logging-steps 5 --resume auto)
name=bloom-zh-image-test-stop
"${ENG[@]}" rm -f "$name" > /dev/null 2>&1 || true
"${ENG[@]}" run -d --name "$name" "${run_opts[@]}" "$IMAGE" "${stop[@]}" > /dev/null
logged=0
for _ in $(seq "$RUN_TIMEOUT"); do
  logged=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$WORK/output/stop/metrics.jsonl" 2> /dev/null | tail -1 || true)
  [ "${logged:-0}" -ge "$STOP_AFTER_STEP" ] && break
  [ "$("${ENG[@]}" inspect --format '{{.State.Running}}' "$name")" = true ] || break
  sleep 1
done
log "stopping $name at logged step ${logged:-none}"
"${ENG[@]}" stop -t 600 "$name" > /dev/null
stop_rc=$("${ENG[@]}" wait "$name" 2> /dev/null | tail -1 || true)
[ -n "$stop_rc" ] || stop_rc=$("${ENG[@]}" inspect --format '{{.State.ExitCode}}' "$name")
"${ENG[@]}" logs "$name" > "$WORK/stop.log" 2>&1
"${ENG[@]}" rm "$name" > /dev/null
expect stop "$stop_rc" 75
ckpt=$(complete_checkpoints "$WORK/output/stop" | tail -1)
[ -n "$ckpt" ] || die "stopped with exit 75 but no complete checkpoint in $WORK/output/stop"
stop_step=$(step_of "$ckpt")
[ "${stop_step:-0}" -gt 0 ] && [ "$stop_step" -lt "$STOP_STEPS" ] || die "checkpoint at step '$stop_step' is not mid-run"
log "complete checkpoint $(basename "$ckpt") (step $stop_step)"
resume_rc=$(run resume "${stop[@]}"); expect resume "$resume_rc" 0 "done:"
grep -qE "resum.*$(basename "$ckpt")" "$WORK/resume.log" || die "the rerun did not resume from $(basename "$ckpt")"
resume_step=$(step_of "$(complete_checkpoints "$WORK/output/stop" | tail -1)")
[ "$resume_step" = "$STOP_STEPS" ] || die "the resumed run ended at step '$resume_step', not $STOP_STEPS"
rerun_rc=$(run rerun "${stop[@]}"); expect rerun "$rerun_rc" 0 "nothing to do"
rerun_step=$(step_of "$(complete_checkpoints "$WORK/output/stop" | tail -1)")
[ "$rerun_step" = "$STOP_STEPS" ] || die "the third run moved the last checkpoint to step $rerun_step"

# What the job wrote on the host volumes must be readable by another uid (a serving pod, an evaluation job):
# every file o+r, every folder o+rx, and `smoke` as uid 2000 on a read-only /output loads the export.
unreadable=$(find "$WORK/output" \( -type f ! -perm -o=r \) -o \( -type d ! -perm -o=rx \) | sed "s|^$WORK/output/||")
n_unreadable=$(printf '%s' "$unreadable" | grep -c . || true)
other_rc=0
timeout "$RUN_TIMEOUT" "${ENG[@]}" run --rm --network none --read-only --user 2000:2000 "${ULIMITS[@]}" \
  "${RUN_EXTRA[@]}" --tmpfs /cache:rw,mode=1777 -v "$WORK/output:/output:ro" "$IMAGE" smoke --model /output/stop/final \
  > "$WORK/smoke-other-uid.log" 2>&1 || other_rc=$?

python3 - "$build_s" "$size" "$quick_step" "$train_s" "$stop_rc" "$stop_step" "$resume_step" "$rerun_step" \
  "$n_unreadable" "$other_rc" "$((SECONDS - t0))" "$ENGINE" "$IMAGE" "$resume_rc" "$rerun_rc" <<'EOF'
import json, sys
a = sys.argv[1:]
print(json.dumps({
    "image": a[12], "engine": a[11], "build_s": int(a[0]), "image_mb": round(int(a[1]) / 1e6),
    "quickstart_steps": int(a[2]), "quickstart_train_s": int(a[3]), "network": "none", "read_only_root": True,
    "user": "1000:1000", "stop_exit": int(a[4]), "checkpoint_step_at_stop": int(a[5]),
    "resume_exit": int(a[13]), "resumed_to_step": int(a[6]), "rerun_exit": int(a[14]), "rerun_step": int(a[7]),
    "unreadable_by_other_uid": int(a[8]), "smoke_other_uid_exit": int(a[9]), "total_s": int(a[10]),
}))
EOF
if [ "$n_unreadable" != 0 ] || [ "$other_rc" != 0 ]; then
  log "FAIL: another uid cannot read what the job wrote (smoke as uid 2000: exit $other_rc; log $WORK/smoke-other-uid.log)"
  printf '%s\n' "$unreadable" | head -20 | sed 's/^/  not readable by others: /' >&2
  exit 1
fi
log "all checks passed"
