{{/*
Labels of every object's metadata: kustomize's `app.kubernetes.io/part-of: powercap` and
Helm's standard labels. Never in a selector or a pod template (a selector is immutable, and
the pods' labels stay those of config/default, so that both installs select the same pods).
*/}}
{{- define "powercap.labels" -}}
app.kubernetes.io/part-of: powercap
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Where every namespaced object goes: namespace.name, else the release's (`helm install -n`). */}}
{{- define "powercap.namespace" -}}
{{ .Values.namespace.name | default .Release.Namespace }}
{{- end }}

{{/* The image of every powercap container: repository@digest, else repository:tag. */}}
{{- define "powercap.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default (printf "v%s" .Chart.AppVersion) }}
{{- end -}}
{{- end }}

{{/*
What every pod template's spec gets from the values beside the chart's own fields:
imagePullSecrets (global), and the program's nodeSelector, affinity and tolerations, each
only when set. Called with (dict "root" $ "program" .Values.<program>).
*/}}
{{- define "powercap.podPlacement" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .program.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .program.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .program.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A pod template's annotations: the chart's own (a dict, may be empty) and podAnnotations;
the chart's win where both name one. Nothing when both are empty.
*/}}
{{- define "powercap.podAnnotations" -}}
{{- $annotations := merge (deepCopy .own) (deepCopy (.root.Values.podAnnotations | default dict)) -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* imagePullPolicy of the powercap containers other than the agent's: set only when given. */}}
{{- define "powercap.pullPolicy" -}}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/*
The cluster's version as registry.k8s.io tags it: v1.31.2 for v1.31.2-eks-a737599 or
v1.31.2+k3s1 (vendor suffixes stripped).
*/}}
{{- define "powercap.clusterVersion" -}}
{{ regexReplaceAll "[-+].*$" .Capabilities.KubeVersion.Version "" }}
{{- end }}

{{/*
kube-scheduler's image, its tag the cluster's version unless scheduler.image.tag is set;
with scheduler.image.digest, repository[:tag]@digest (the tag only when set: with a digest
an empty tag does not follow the cluster, and the version is then checked nowhere).
Rendering fails when the tag names a minor version that Kubernetes' version skew policy
does not support against this cluster: kube-scheduler must not be newer than the API
server and may be at most one minor older (the same rule as powercap/versionskew.py, which
the pod's init container check-scheduler-version applies at run time). A tag that names no
version (a digest, `latest`) is not checked here.
*/}}
{{- define "powercap.schedulerImage" -}}
{{- $digest := .Values.scheduler.image.digest -}}
{{- $tag := .Values.scheduler.image.tag | default (ternary "" (include "powercap.clusterVersion" .) (not (empty $digest))) -}}
{{- $image := .Values.scheduler.image.repository -}}
{{- if $tag }}{{ $image = printf "%s:%s" $image $tag }}{{ end -}}
{{- if $digest }}{{ $image = printf "%s@%s" $image $digest }}{{ end -}}
{{- $version := regexFind "^v?[0-9]+\\.[0-9]+" $tag | trimPrefix "v" -}}
{{- if $version -}}
{{- $scheduler := splitList "." $version -}}
{{- $apiMajor := .Capabilities.KubeVersion.Major | trimSuffix "+" | atoi -}}
{{- $apiMinor := .Capabilities.KubeVersion.Minor | trimSuffix "+" | atoi -}}
{{- $major := index $scheduler 0 | atoi -}}
{{- $minor := index $scheduler 1 | atoi -}}
{{- $relation := "" -}}
{{- if or (ne $major $apiMajor) (gt $minor $apiMinor) -}}
{{- $relation = "newer than" -}}
{{- else if gt (sub $apiMinor $minor) 1 -}}
{{- $relation = printf "%d minor versions older than" (sub $apiMinor $minor) -}}
{{- end -}}
{{- if $relation -}}
{{- fail (printf "kube-scheduler %d.%d (image %s) is %s the API server %d.%d; the version skew policy allows kube-scheduler %d.%d or %d.%d: set scheduler.image.tag to the cluster's version, or leave it empty to follow the cluster (docs/operations.md#the-scheduler-image)" $major $minor $image $relation $apiMajor $apiMinor $apiMajor $apiMinor $apiMajor (sub $apiMinor 1)) -}}
{{- end -}}
{{- end -}}
{{ $image }}
{{- end }}

{{/* --rack-label for the programs that take it, only when it differs from their default. */}}
{{- define "powercap.rackLabelArg" -}}
{{- if ne .Values.rackLabel "powercapping.example.com/rack" }}
- --rack-label={{ .Values.rackLabel }}
{{- end }}
{{- end }}

{{/* --node-overhead-w and --non-gpu-rise for the extender and the controller (docs/controller.md,
"Whole-node power"), only when they differ from their defaults. */}}
{{- define "powercap.nodePowerArgs" -}}
{{- if ne (toString .Values.nodePower.overheadW) "0" }}
- --node-overhead-w={{ .Values.nodePower.overheadW }}
{{- end }}
{{- if ne (toString .Values.nodePower.nonGpuRise) "0.3" }}
- --non-gpu-rise={{ .Values.nodePower.nonGpuRise }}
{{- end }}
{{- end }}
