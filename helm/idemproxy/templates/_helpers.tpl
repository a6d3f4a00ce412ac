{{/*
Helpers. Every one of them takes a context with .Values (this chart's values) and
.Release, so that another chart can call the sidecar templates with
(dict "Values" .Values.idemproxy "Release" .Release): nothing here reads .Chart,
which would be the including chart's.
*/}}

{{- define "idemproxy.name" -}}
{{- default "idemproxy" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "idemproxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "idemproxy.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "idemproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idemproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of this chart's own objects (called with the root context only). */}}
{{- define "idemproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "idemproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "idemproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "idemproxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "idemproxy.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{- define "idemproxy.redisName" -}}
{{- printf "%s-redis" (include "idemproxy.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The store URL written into the configuration file; empty when it comes from a Secret. */}}
{{- define "idemproxy.storeUrl" -}}
{{- if .Values.store.url -}}
{{- .Values.store.url -}}
{{- else if .Values.store.existingSecret.name -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "idemproxy.redisName" .) -}}
{{- else -}}
sqlite:////var/lib/idemproxy/ledger.db
{{- end -}}
{{- end -}}

{{- define "idemproxy.usesSqlite" -}}
{{- if hasPrefix "sqlite:" (include "idemproxy.storeUrl" .) -}}true{{- end -}}
{{- end -}}

{{/* listen address of the proxy listener */}}
{{- define "idemproxy.listen" -}}
{{- $host := ternary .Values.sidecar.listenHost .Values.bindAddress (eq .Values.mode "sidecar") -}}
{{- include "idemproxy.hostPort" (list $host .Values.ports.proxy) -}}
{{- end -}}

{{/* HOST:PORT, the host bracketed when it is an IPv6 address. Takes (list HOST PORT). */}}
{{- define "idemproxy.hostPort" -}}
{{- $host := index . 0 -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int (index . 1)) -}}
{{- else -}}
{{- printf "%s:%d" $host (int (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* listen address of the admin listener (the operations API): loopback unless adminBindAddress says otherwise */}}
{{- define "idemproxy.adminListen" -}}
{{- include "idemproxy.hostPort" (list .Values.adminBindAddress .Values.ports.admin) -}}
{{- end -}}

{{/* listen address of the metrics listener (/metrics, /healthz, /readyz): the kubelet and Prometheus */}}
{{- define "idemproxy.metricsListen" -}}
{{- include "idemproxy.hostPort" (list .Values.bindAddress .Values.ports.metrics) -}}
{{- end -}}

{{/*
"true" when the admin listener is reachable from outside the pod: adminBindAddress is
not a loopback form (127.x.x.x, ::1, localhost; the same forms values.schema.json and
the proxy accept without auth). The admin port is then declared and published.
*/}}
{{- define "idemproxy.adminExposed" -}}
{{- $host := .Values.adminBindAddress -}}
{{- $octet := "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])" -}}
{{- if not (or (eq $host "::1" "localhost") (regexMatch (printf "^127\\.%s\\.%s\\.%s$" $octet $octet $octet) $host)) -}}true{{- end -}}
{{- end -}}

{{- define "idemproxy.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add (int .Values.preStopSleepSeconds) (int .Values.shutdownGraceSeconds) 5 -}}
{{- else -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/*
Checks across values that a JSON schema cannot express with a clear message.
Rendered (to nothing) by every template that depends on them.
*/}}
{{- define "idemproxy.validate" -}}
{{- $v := .Values -}}
{{- if and $v.upstream $v.config.routes -}}
{{- fail "idemproxy: set either upstream (one tool for every path) or config.routes, not both" -}}
{{- end -}}
{{- if not (or $v.upstream $v.config.routes) -}}
{{- fail "idemproxy: no tool to proxy: set upstream (e.g. --set upstream=http://tool:9000) or config.routes" -}}
{{- end -}}
{{- $stores := 0 -}}
{{- if $v.store.url }}{{ $stores = add1 $stores }}{{ end -}}
{{- if $v.store.existingSecret.name }}{{ $stores = add1 $stores }}{{ end -}}
{{- if $v.redis.enabled }}{{ $stores = add1 $stores }}{{ end -}}
{{- if gt $stores 1 -}}
{{- fail "idemproxy: choose one store: store.url, store.existingSecret.name or redis.enabled" -}}
{{- end -}}
{{- if and $v.store.existingSecret.name (or $v.store.options.min_replicas_ack $v.store.options.replica_ack_timeout) -}}
{{- /* idemproxy reads min_replicas_ack against the file's store URL, before IDEMPROXY_STORE applies, and drops it when that variable is set. */ -}}
{{- fail "idemproxy: store.options.min_replicas_ack and replica_ack_timeout need the store URL in store.url, not in store.existingSecret (the proxy would refuse or ignore them)" -}}
{{- end -}}
{{- if and (eq $v.mode "standalone") (include "idemproxy.usesSqlite" .) (or $v.autoscaling.enabled (gt (int $v.replicaCount) 1)) -}}
{{- fail "idemproxy: the SQLite store lives inside one pod, so every replica would keep its own ledger and duplicates could reach the tool twice; with replicaCount > 1 or autoscaling use Redis (store.url, store.existingSecret or redis.enabled)" -}}
{{- end -}}
{{- if le (int (include "idemproxy.terminationGracePeriodSeconds" .)) (add (int $v.preStopSleepSeconds) (int $v.shutdownGraceSeconds)) -}}
{{- fail (printf "idemproxy: terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + shutdownGraceSeconds (%d), or in-flight requests are killed before they finish" (int (include "idemproxy.terminationGracePeriodSeconds" .)) (add (int $v.preStopSleepSeconds) (int $v.shutdownGraceSeconds))) -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (not (kindIs "invalid" $v.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable)) -}}
{{- fail "idemproxy: podDisruptionBudget takes minAvailable or maxUnavailable, not both (set the other to null)" -}}
{{- end -}}
{{- if or (eq (int $v.ports.proxy) (int $v.ports.admin)) (eq (int $v.ports.proxy) (int $v.ports.metrics)) (eq (int $v.ports.admin) (int $v.ports.metrics)) -}}
{{- fail (printf "idemproxy: ports.proxy (%d), ports.admin (%d) and ports.metrics (%d) must differ" (int $v.ports.proxy) (int $v.ports.admin) (int $v.ports.metrics)) -}}
{{- end -}}
{{- /* values.schema.json says so too; this holds when an install skips the schema. */ -}}
{{- if and (include "idemproxy.adminExposed" .) (not (kindIs "map" $v.config.auth)) -}}
{{- fail (printf "idemproxy: adminBindAddress %s is not loopback: anyone in the cluster could reach the operations API (stored answers, resolving operations), so it needs config.auth with an identity that has 'ops: admin'; or keep adminBindAddress 127.0.0.1 and use kubectl port-forward" $v.adminBindAddress) -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled (eq $v.mode "sidecar") -}}
{{- fail "idemproxy: networkPolicy is for standalone mode: in sidecar mode the pods are the agent's, and the chart that makes them owns their NetworkPolicy (the proxy listens on loopback there)" -}}
{{- end -}}
{{- end -}}
