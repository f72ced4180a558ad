// Command etcd is upstream's etcd server entry point (server/main.go), built from the
// go.etcd.io/etcd/server/v3 module pinned in go.mod (see scripts/controlplane.sh).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
