#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd at the release pinned in tools/k8s/go.mod into a cache
# directory keyed by that release, once per machine, plus cri-sandbox (a small CRI client that
# drives containerd as kubelet does; tests/kube/test_kube_lab.py). Prints the directory.
#   tools/k8s/build.sh            build what is missing, print the directory
#   tools/k8s/build.sh --kubelet  also kubelet, which `tether lab up --kubernetes` runs on every lab host
#                                 (scripts/install-deps builds it; ~3 CPU-minutes more than the rest)
#   tools/k8s/build.sh --print    print the directory only
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
release="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/go.mod")"
etcd_release="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$here/go.mod")"
dir="${TETHER_K8S_CACHE:-/var/cache/tether/k8s}/$release-etcd-$etcd_release"
if [ "${1:-}" = "--print" ]; then echo "$dir"; exit 0; fi
want_kubelet=; [ "${1:-}" = "--kubelet" ] && want_kubelet=1
built() { [ -x "$dir/kube-apiserver" ] && [ -x "$dir/kubectl" ] && [ -x "$dir/etcd" ]; }
complete() { built && [ -x "$dir/cri-sandbox" ] && { [ -z "$want_kubelet" ] || [ -x "$dir/kubelet" ]; }; }
if complete; then echo "$dir"; exit 0; fi
# one build at a time: install-deps starts it in the background, and a test that needs it meanwhile
# waits here for that build instead of starting a second one. kubelet has a lock of its own, taken
# after the first is released: whoever needs only the control plane goes on while kubelet builds.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
gobuild() {
  command -v go >/dev/null || { echo "tools/k8s/build.sh: go is not installed; install Go >= 1.26" >&2; exit 1; }
  (cd "$here" && GOFLAGS=-trimpath CGO_ENABLED=0 go build -ldflags="-s -w $2" -o "$1" "${@:3}")
}
start=$(date +%s)
if ! built; then
  mkdir -p "$dir.tmp"
  gobuild "$dir.tmp/" "" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl ./cmd/etcd
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "tools/k8s/build.sh: built $release (etcd $etcd_release) in $(( $(date +%s) - start ))s" >&2
fi
[ -x "$dir/cri-sandbox" ] || gobuild "$dir/cri-sandbox" "" ./cmd/cri-sandbox
flock -u 9
if [ -n "$want_kubelet" ] && [ ! -x "$dir/kubelet" ]; then
  exec 8>"$dir.kubelet.lock"
  flock 8
  if [ ! -x "$dir/kubelet" ]; then
    start=$(date +%s)
    # kubelet reports its version to the apiserver (the Node's kubeletVersion): stamp the release
    gobuild "$dir/kubelet.tmp" "-X k8s.io/component-base/version.gitVersion=$release" k8s.io/kubernetes/cmd/kubelet
    mv "$dir/kubelet.tmp" "$dir/kubelet"
    echo "tools/k8s/build.sh: built kubelet $release in $(( $(date +%s) - start ))s" >&2
  fi
fi
echo "$dir"
