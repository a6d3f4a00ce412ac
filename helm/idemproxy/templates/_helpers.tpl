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
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int .Values.ports.proxy) -}}
{{- else -}}
{{- printf "%s:%d" $host (int .Values.ports.proxy) -}}
{{- end -}}
{{- end -}}

{{- define "idemproxy.adminListen" -}}
{{- if contains ":" .Values.bindAddress -}}
{{- printf "[%s]:%d" .Values.bindAddress (int .Values.ports.admin) -}}
{{- else -}}
{{- printf "%s:%d" .Values.bindAddress (int .Values.ports.admin) -}}
{{- end -}}
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
{{- if eq (int $v.ports.proxy) (int $v.ports.admin) -}}
{{- fail "idemproxy: ports.proxy and ports.admin must differ" -}}
{{- end -}}
{{- end -}}
