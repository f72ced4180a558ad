#!/usr/bin/env bash
# End to end on a throw-away kind cluster: install powercap with `kubectl apply -k
# config/default`, apply the sample policies, show a refused policy's message, schedule GPU
# pods with the power-aware scheduler and print which rack each landed in.
#
# Usage: scripts/e2e-kind.sh            (needs docker, kind, kubectl and python3 >= 3.10)
# Environment:
#   CLUSTER           kind cluster name (default powercap-e2e)
#   KIND_NODE_IMAGE   node image (default kindest/node:v1.32.2, the Kubernetes the manifests are checked against)
#   KEEP_CLUSTER=1    leave the cluster running at the end (delete it with `kind delete cluster --name $CLUSTER`)
#
# kind nodes have no GPUs. The script makes three workers look like GPU nodes to the
# scheduler: 4 `nvidia.com/gpu` in their status, a rack label each, and the telemetry
# annotation the node agent would write (powercap/telemetry.py's format), refreshed every
# 20 s. The node agent DaemonSet itself stays at 0 pods: its node affinity asks for
# nvidia.com/gpu.present=true, which these workers do not have (it needs real NVML).
#
# The racks, as the sample policy config/samples/rack-constraints.yaml sees them:
#   rack-1  4920 W of 5000 W maxPower       -> refused: no room for another GPU pod
#   rack-2  inlet 29 °C >= maxTemperature 28 -> refused: too hot
#   rack-3  in no policy                     -> where the GPU pods land
# tests/test_e2e_script.py keeps these names and this story in step with the manifests,
# the code and the extender's decisions.
set -euo pipefail

# Names shared with the manifests and the code (checked by tests/test_e2e_script.py).
readonly NAMESPACE=powercap-system
readonly SCHEDULER_NAME=power-aware-scheduler
readonly RACK_LABEL=powercapping.example.com/rack
readonly NODE_TELEMETRY_KIND=PowerCapNode
readonly NODE_TELEMETRY_API_VERSION=powercapping.example.com/v1alpha1
readonly POLICY_LABEL=powercapping.example.com/policy
readonly GPU_RESOURCE=nvidia.com/gpu
readonly POLICY_SAMPLE=config/samples/rack-constraints.yaml
readonly POLICY_NAME=llm-inference-power-capping
readonly WORKLOADS=(deployment/powercap-webhook deployment/power-aware-scheduler deployment/powercap-controller daemonset/powercap-agent)

# The three workers, in kind's naming order: rack, power of each GPU (W), inlet temperature (°C).
readonly RACKS=(rack-1 rack-2 rack-3)
readonly GPU_POWER_W=(615 150 110)
readonly INLET_C=(24 29 22)
readonly GPUS_PER_NODE=8
readonly GPU_PODS=3

CLUSTER="${CLUSTER:-powercap-e2e}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.32.2}"
IMAGE=powercap:e2e
WORK=out/e2e-kind
REFRESHER=""

kind_config() {
  cat <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
  - role: worker
EOF
}

# The overlay this script applies: config/default with the image built here and
# kube-scheduler at the node image's version. A tag other
# than `latest` keeps the default imagePullPolicy at IfNotPresent, so the image loaded
# into the nodes is used instead of being pulled.
overlay_kustomization() {
  cat <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../config/default
images:
  - name: powercap
    newName: ${IMAGE%%:*}
    newTag: ${IMAGE##*:}
  # the scheduler at the cluster's version (docs/operations.md#the-scheduler-image)
  - name: registry.k8s.io/kube-scheduler
    newTag: ${KIND_NODE_IMAGE##*:}
EOF
}

# telemetry_json GPU_POWER_W INLET_C: what the node agent writes to its PowerCapNode's status, for
# GPUS_PER_NODE GPUs without a pod, each drawing GPU_POWER_W.
telemetry_json() {
  local per_gpu_w="$1" inlet_c="$2" gpus="" i
  local power_w=$((per_gpu_w * GPUS_PER_NODE))
  for ((i = 0; i < GPUS_PER_NODE; i++)); do
    gpus+="${gpus:+,}{\"uuid\":\"GPU-e2e-$i\",\"index\":$i,\"powerW\":$per_gpu_w,\"limitW\":700,\"minW\":200,\"maxW\":700,\"temperatureC\":45,\"pod\":null}"
  done
  printf '{"timestamp":"%s","powerW":%s,"inletTemperatureC":%s,"gpus":[%s]}' \
    "$(date -u +%Y-%m-%dT%H:%M:%S.000Z)" "$power_w" "$inlet_c" "$gpus"
}

# gpu_pod NAME [RACK...]: a one-GPU pod of the sample policy's service, scheduled by the
# power-aware scheduler; with racks, node affinity keeps it to those racks.
gpu_pod() {
  local name="$1" affinity=""
  shift
  if [ $# -gt 0 ]; then
    affinity="
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions:
              - {key: ${RACK_LABEL}, operator: In, values: [$(IFS=,; echo "$*")]}"
  fi
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: ${name}
  namespace: default
  labels:
    ${POLICY_LABEL}: ${POLICY_NAME}
spec:
  schedulerName: ${SCHEDULER_NAME}${affinity}
  containers:
    - name: inference
      image: registry.k8s.io/pause:3.10
      resources:
        limits:
          ${GPU_RESOURCE}: 1
EOF
}

# A policy the webhook refuses: the algorithm's parameters are out of range.
refused_policy() {
  cat <<'EOF'
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata:
  name: refused-example
  namespace: default
spec:
  powerCapLimit: 1000
  customAlgorithm:
    name: energy-aware-scheduling
    parameters:
      energyThreshold: 0
      migrationInterval: 10
EOF
}

workers() {
  kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sort
}

# publish_telemetry: each worker's PowerCapNode, as its node agent would publish it (kind
# has no GPUs, so no agent runs): created once, then its status patched. As the admin: the
# admission policy binds only the agent's ServiceAccount to its own node.
publish_telemetry() {
  local i=0 node name
  for node in $(workers); do
    name="${node#node/}"
    if ! kubectl get "powercapnode/$name" >/dev/null 2>&1; then
      printf '{"apiVersion":"%s","kind":"%s","metadata":{"name":"%s"}}' "$NODE_TELEMETRY_API_VERSION" "$NODE_TELEMETRY_KIND" "$name" |
        kubectl create -f - >/dev/null
    fi
    kubectl patch "powercapnode/$name" --subresource=status --type=merge \
      -p "{\"status\":$(telemetry_json "${GPU_POWER_W[$i]}" "${INLET_C[$i]}")}" >/dev/null
    i=$((i + 1))
  done
}

step() {
  printf '\n==> %s\n' "$*"
}

cleanup() {
  local status=$?
  if [ -n "$REFRESHER" ]; then
    pkill -P "$REFRESHER" 2>/dev/null || true  # its sleep
    kill "$REFRESHER" 2>/dev/null || true
  fi
  if [ "${KEEP_CLUSTER:-}" = 1 ]; then
    echo "cluster $CLUSTER kept (KEEP_CLUSTER=1): kind delete cluster --name $CLUSTER" >&2
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$status"
}

main() {
  cd "$(dirname "$0")/.."
  local tool
  for tool in docker kind kubectl python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is needed" >&2; exit 2; }
  done
  mkdir -p "$WORK"

  step "creating kind cluster $CLUSTER (1 control-plane, 3 workers)"
  kind_config >"$WORK/kind.yaml"
  trap cleanup EXIT
  kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --config "$WORK/kind.yaml" --wait 120s
  kubectl config use-context "kind-$CLUSTER" >/dev/null

  step "making the workers look like GPU nodes in racks"
  local i=0 node
  for node in $(workers); do
    kubectl label --overwrite "$node" "$RACK_LABEL=${RACKS[$i]}" >/dev/null
    kubectl patch "$node" --subresource=status --type=json \
      -p "[{\"op\":\"add\",\"path\":\"/status/capacity/${GPU_RESOURCE/\//~1}\",\"value\":\"$GPUS_PER_NODE\"}]" >/dev/null
    echo "$node: ${RACKS[$i]}, $GPUS_PER_NODE GPUs, $((GPU_POWER_W[i] * GPUS_PER_NODE)) W, inlet ${INLET_C[$i]} °C"
    i=$((i + 1))
  done
  publish_telemetry
  (while sleep 20; do publish_telemetry || true; done) >/dev/null 2>&1 &
  REFRESHER=$!

  step "building $IMAGE and loading it into the nodes"
  docker build -t "$IMAGE" .
  kind load docker-image "$IMAGE" --name "$CLUSTER"

  step "installing: kubectl apply -k config/default (image $IMAGE)"
  overlay_kustomization >"$WORK/kustomization.yaml"
  kubectl apply -k "$WORK"
  step "webhook certificate: scripts/webhook-certs.sh"
  scripts/webhook-certs.sh --namespace "$NAMESPACE" --out "$WORK/certs"
  local workload
  for workload in "${WORKLOADS[@]}"; do
    kubectl -n "$NAMESPACE" rollout status "$workload" --timeout=300s
  done

  step "applying the sample policies (config/samples/; $POLICY_SAMPLE last, the one the pods follow)"
  kubectl create namespace inference --dry-run=client -o yaml | kubectl apply -f -
  local sample
  for sample in config/samples/*.yaml; do
    [ "$sample" = "$POLICY_SAMPLE" ] || kubectl apply -f "$sample"
  done
  kubectl apply -f "$POLICY_SAMPLE"

  step "a policy the webhook refuses"
  refused_policy >"$WORK/refused.yaml"
  if kubectl apply -f "$WORK/refused.yaml" 2>"$WORK/refused.txt"; then
    echo "error: the webhook accepted an invalid policy" >&2
    exit 1
  fi
  cat "$WORK/refused.txt"

  step "scheduling $GPU_PODS GPU pods with schedulerName: $SCHEDULER_NAME"
  publish_telemetry
  for ((i = 1; i <= GPU_PODS; i++)); do
    gpu_pod "llm-$i" | kubectl apply -f -
  done
  for ((i = 1; i <= GPU_PODS; i++)); do
    kubectl wait --for=condition=PodScheduled "pod/llm-$i" --timeout=120s >/dev/null
  done
  printf '%-8s %-28s %s\n' POD NODE RACK
  for ((i = 1; i <= GPU_PODS; i++)); do
    node="$(kubectl get pod "llm-$i" -o jsonpath='{.spec.nodeName}')"
    printf '%-8s %-28s %s\n' "llm-$i" "$node" "$(kubectl get node "$node" -o jsonpath="{.metadata.labels.${RACK_LABEL//./\\.}}")"
  done

  step "a pod kept to rack-1 and rack-2 stays Pending; kubectl describe shows why"
  gpu_pod llm-pinned rack-1 rack-2 | kubectl apply -f -
  local reasons=""
  for ((i = 0; i < 30; i++)); do
    reasons="$(kubectl get events --field-selector involvedObject.name=llm-pinned,reason=FailedScheduling \
      -o jsonpath='{.items[-1:].message}')"
    [ -z "$reasons" ] || break
    sleep 2
  done
  echo "${reasons:-no FailedScheduling event yet: kubectl describe pod llm-pinned}"

  step "the policies as the controller reports them"
  kubectl get pcp -A -o wide
  step "done"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
