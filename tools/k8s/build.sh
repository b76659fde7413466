#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd at the release pinned in tools/k8s/go.mod into a cache
# directory keyed by that release, once per machine, plus cri-sandbox (a small CRI client that
# drives containerd as kubelet does; tests/kube/test_containerd_cri.py). Prints the directory.
#   tools/k8s/build.sh            build what is missing, print the directory
#   tools/k8s/build.sh --kubelet  also kubelet (opt-in: it cannot run on the project's VMs, see
#                                 docs/KUBERNETES.md, and a cold build takes 15+ minutes on 2 cores)
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
# waits here for that build instead of starting a second one
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if complete; then echo "$dir"; exit 0; fi
command -v go >/dev/null || { echo "tools/k8s/build.sh: go is not installed; install Go >= 1.26" >&2; exit 1; }
gobuild() { (cd "$here" && GOFLAGS=-trimpath CGO_ENABLED=0 go build -ldflags='-s -w' -o "$1" "${@:2}"); }
start=$(date +%s)
if ! built; then
  mkdir -p "$dir.tmp"
  gobuild "$dir.tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl ./cmd/etcd
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
[ -x "$dir/cri-sandbox" ] || gobuild "$dir/cri-sandbox" ./cmd/cri-sandbox
# kubelet reports its version to the apiserver (the Node's kubeletVersion): stamp the release
[ -z "$want_kubelet" ] || [ -x "$dir/kubelet" ] || (cd "$here" && GOFLAGS=-trimpath CGO_ENABLED=0 go build \
    -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$release" -o "$dir/kubelet" k8s.io/kubernetes/cmd/kubelet)
echo "tools/k8s/build.sh: built $release (etcd $etcd_release) in $(( $(date +%s) - start ))s" >&2
echo "$dir"
