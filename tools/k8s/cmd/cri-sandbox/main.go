// cri-sandbox drives a CRI runtime (containerd) the way kubelet does for one pod sandbox:
// RunPodSandbox (the runtime then calls CNI ADD), PodSandboxStatus (the IP kubelet reports),
// then, with -remove, StopPodSandbox + RemovePodSandbox (CNI DEL).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	sock := flag.String("endpoint", "/run/containerd/containerd.sock", "CRI socket")
	name := flag.String("name", "p1", "pod name")
	ns := flag.String("namespace", "default", "pod namespace")
	uid := flag.String("uid", "00000000-0000-0000-0000-000000000001", "pod uid")
	remove := flag.String("remove", "", "sandbox id to stop and remove")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+*sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	c := runtime.NewRuntimeServiceClient(conn)
	if *remove != "" {
		if _, err := c.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: *remove}); err != nil {
			fail(err)
		}
		if _, err := c.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: *remove}); err != nil {
			fail(err)
		}
		fmt.Println(`{"removed": true}`)
		return
	}
	v, err := c.Version(ctx, &runtime.VersionRequest{})
	if err != nil {
		fail(err)
	}
	cfg := &runtime.PodSandboxConfig{
		Metadata:     &runtime.PodSandboxMetadata{Name: *name, Namespace: *ns, Uid: *uid},
		Hostname:     *name,
		LogDirectory: "/tmp/h31/kl/pods/" + *uid,
		Linux:        &runtime.LinuxPodSandboxConfig{},
	}
	r, err := c.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		fail(err)
	}
	st, err := c.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: r.PodSandboxId})
	if err != nil {
		fail(err)
	}
	out, _ := json.Marshal(map[string]any{"runtime": v.RuntimeName + " " + v.RuntimeVersion, "cri": v.RuntimeApiVersion,
		"sandbox": r.PodSandboxId, "ip": st.Status.GetNetwork().GetIp()})
	fmt.Println(string(out))
}

func fail(err error) { fmt.Fprintln(os.Stderr, "cri-sandbox:", err); os.Exit(1) }
