{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-switchyard, or the release name if it already contains the chart name. */}}
{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ (default .Chart.AppVersion .Values.image.tag) | quote }}
app.kubernetes.io/component: router
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Whether engines are discovered from the Kubernetes API; fails on an unknown discovery.type. */}}
{{- define "switchyard.k8sDiscovery" -}}
{{- if eq .Values.discovery.type "k8s" }}true
{{- else if ne .Values.discovery.type "static" }}
{{- fail (printf "discovery.type must be k8s or static, not %q" .Values.discovery.type) }}
{{- end }}
{{- end }}

{{/* Namespace of the engine Pods. */}}
{{- define "switchyard.discoveryNamespace" -}}
{{- default .Release.Namespace .Values.discovery.namespace }}
{{- end }}

{{/* The ServiceAccount the Pods run as ("" = the namespace's default). */}}
{{- define "switchyard.serviceAccountName" -}}
{{- if and .Values.serviceAccount.create (include "switchyard.k8sDiscovery" .) }}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "switchyard.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "switchyard.fullname" .)) .Values.policies.existingConfigMap }}
{{- end }}

{{- define "switchyard.adminTokenSecret" -}}
{{- if .Values.adminToken.existingSecret }}
{{- .Values.adminToken.existingSecret }}
{{- else if .Values.adminToken.value }}
{{- printf "%s-admin-token" (include "switchyard.fullname" .) }}
{{- end }}
{{- end }}

{{- define "switchyard.adminTokenKey" -}}
{{- if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* terminationGracePeriodSeconds: above the preStop sleep plus --shutdown-grace. */}}
{{- define "switchyard.terminationGrace" -}}
{{- $drain := add (int .Values.router.shutdownGrace) (int .Values.lifecycle.preStopSleepSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 15 }}
{{- else if eq (toString .Values.terminationGracePeriodSeconds) "" }}
{{- add $drain 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed lifecycle.preStopSleepSeconds + router.shutdownGrace (%d), or draining streams are killed" .Values.terminationGracePeriodSeconds $drain) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The `switchyard serve` arguments, one per line of a YAML list. */}}
{{- define "switchyard.args" -}}
- serve
- --host
- {{ .Values.router.host | quote }}
- --port
- {{ .Values.router.port | quote }}
- --policies-dir
- /etc/switchyard/policies
{{- if .Values.router.config }}
- --config
- /etc/switchyard/config/switchyard.toml
{{- end }}
- --routing-logic
- {{ required "router.routingLogic is required" .Values.router.routingLogic | quote }}
{{- if hasKey .Values.router "imbalancedThreshold" }}
{{- fail "router.imbalancedThreshold is not a chart value: the chart serves policies from a ConfigMap directory, where the threshold lives in load_balanced_kvaware.rhai (set policies.files.\"load_balanced_kvaware.rhai\", or kubectl edit the ConfigMap: hot-reloaded)" }}
{{- end }}
- --log-level
- {{ .Values.router.logLevel | quote }}
{{- if ne (toString .Values.router.engineStatsInterval) "" }}
- --engine-stats-interval
- {{ .Values.router.engineStatsInterval | toString | quote }}
{{- end }}
{{- with .Values.router.sessionKey }}
- --session-key
- {{ . | quote }}
{{- end }}
{{- if .Values.router.decisionHeaders }}
- --decision-headers
{{- end }}
- --shutdown-grace
- {{ .Values.router.shutdownGrace | toString | quote }}
{{- if include "switchyard.k8sDiscovery" . }}
- --service-discovery
- k8s
- --k8s-namespace
- {{ include "switchyard.discoveryNamespace" . | quote }}
- --k8s-label-selector
- {{ required "discovery.labelSelector is required with discovery.type k8s (e.g. --set discovery.labelSelector=app=vllm)" .Values.discovery.labelSelector | quote }}
- --k8s-port
- {{ .Values.discovery.port | toString | quote }}
{{- else }}
{{- if not .Values.static.backends }}
{{- fail "static.backends is required with discovery.type static (e.g. --set 'static.backends={http://vllm-0.vllm:8000}')" }}
{{- end }}
- --static-backends
- {{ join "," .Values.static.backends | quote }}
{{- with .Values.static.models }}
- --static-models
- {{ join "," . | quote }}
{{- end }}
{{- end }}
{{- range .Values.router.extraArgs }}
- {{ . | toString | quote }}
{{- end }}
{{- end }}
