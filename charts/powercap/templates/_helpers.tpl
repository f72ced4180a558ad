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

{{- define "powercap.namespace" -}}
{{ required "namespace.name is required" .Values.namespace.name }}
{{- end }}

{{/* The image of every powercap container. */}}
{{- define "powercap.image" -}}
{{- $tag := .Values.image.tag | default (printf "v%s" .Chart.AppVersion) -}}
{{ .Values.image.repository }}:{{ $tag }}
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
kube-scheduler's image, its tag the cluster's version unless scheduler.image.tag is set.
Rendering fails when the tag names a minor version that Kubernetes' version skew policy
does not support against this cluster: kube-scheduler must not be newer than the API
server and may be at most one minor older (the same rule as powercap/versionskew.py, which
the pod's init container check-scheduler-version applies at run time). A tag that names no
version (a digest, `latest`) is not checked here.
*/}}
{{- define "powercap.schedulerImage" -}}
{{- $tag := .Values.scheduler.image.tag | default (include "powercap.clusterVersion" .) -}}
{{- $image := printf "%s:%s" .Values.scheduler.image.repository $tag -}}
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
