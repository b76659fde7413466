// Command etcd is etcd's server at the release kube-apiserver is built against: Debian's etcd
// (3.4) is older than this kube-apiserver supports.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
