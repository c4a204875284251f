#!/usr/bin/env bash
# Install the toolchains and emulators squeeze's non-host targets use (Debian/Ubuntu, needs root or sudo):
#   arm         aarch64-linux-gnu gcc/g++ (cross-compile, static executables), qemu-user (qemu-aarch64)
#   mcu         arm-none-eabi gcc + newlib, qemu-system-arm (mps2-an386, semihosting)
#   mobile-gpu  PoCL (a CPU OpenCL implementation), the OpenCL ICD loader and headers, clinfo
#   report      Chromium, for the test that opens report.html in a real headless browser
# Idempotent: packages already installed are not fetched again, and when all are present it exits in
# well under a second without touching apt. `squeeze doctor` reports what is present.
#
# Usage: scripts/install-toolchains.sh [--check] [all|arm|mcu|mobile-gpu|report ...]   (default: all)
set -euo pipefail

declare -A GROUP=(
  [arm]="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
  [mcu]="gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
  [mobile-gpu]="pocl-opencl-icd ocl-icd-opencl-dev opencl-headers clinfo"
  [report]="chromium"
)

check=0
groups=()
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    all) groups+=(arm mcu mobile-gpu report) ;;
    arm|mcu|mobile-gpu|report) groups+=("$arg") ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-toolchains: unknown argument '$arg' (use all, arm, mcu, mobile-gpu, report, --check)" >&2; exit 2 ;;
  esac
done
[ ${#groups[@]} -eq 0 ] && groups=(arm mcu mobile-gpu report)

wanted=()
for g in "${groups[@]}"; do
  for p in ${GROUP[$g]}; do wanted+=("$p"); done
done

missing=()
for p in "${wanted[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-toolchains: all present (${groups[*]})"
  exit 0
fi
if [ "$check" = 1 ]; then
  echo "install-toolchains: missing: ${missing[*]}"
  exit 1
fi

if ! command -v apt-get >/dev/null; then
  echo "install-toolchains: apt-get not found; install these packages with your system's package manager: ${missing[*]}" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "install-toolchains: run as root (or install sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi

echo "install-toolchains: installing ${missing[*]}"
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or older than a day.
lists=/var/lib/apt/lists
if [ -z "$(find "$lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -n1)" ]; then
  $sudo apt-get update -qq
fi
if ! $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/install-toolchains.log 2>&1; then
  # A stale list can name files the mirror no longer has: refresh once and retry.
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/install-toolchains.log 2>&1 || {
    tail -n 20 /tmp/install-toolchains.log >&2
    echo "install-toolchains: apt-get install failed (log: /tmp/install-toolchains.log)" >&2
    exit 1
  }
fi
echo "install-toolchains: done in $(( $(date +%s) - start )) s"
