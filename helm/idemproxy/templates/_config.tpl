{{/*
The proxy's configuration file, from .Values.config plus what the chart owns:
the listeners, shutdown_grace and the store. Takes (dict "Values" ... "Release" ...).
*/}}
{{- define "idemproxy.configYaml" -}}
{{- $v := .Values -}}
{{- $cfg := dict -}}
{{- range $key, $value := $v.config -}}
{{- if not (kindIs "invalid" $value) -}}
{{- $_ := set $cfg $key $value -}}
{{- end -}}
{{- end -}}
{{- if $v.upstream -}}
{{- $_ := set $cfg "routes" (list (dict "name" "default" "prefix" "/" "upstream" $v.upstream)) -}}
{{- end -}}
{{- $_ := set $cfg "listen" (include "idemproxy.listen" .) -}}
{{- $_ := set $cfg "admin_listen" (include "idemproxy.adminListen" .) -}}
{{- $_ := set $cfg "metrics_listen" (include "idemproxy.metricsListen" .) -}}
{{- $_ := set $cfg "shutdown_grace" (printf "%ds" (int $v.shutdownGraceSeconds)) -}}
{{- $store := deepCopy (default (dict) $v.store.options) -}}
{{- $url := include "idemproxy.storeUrl" . -}}
{{- if $url -}}
{{- $_ := set $store "url" $url -}}
{{- end -}}
{{- if $store -}}
{{- $_ := set $cfg "store" $store -}}
{{- end -}}
# Rendered by the idemproxy chart: check it with `idemproxy check-config FILE`.
{{- if $v.store.existingSecret.name }}
# The store URL comes from Secret {{ $v.store.existingSecret.name }} (IDEMPROXY_STORE).
{{- end }}
{{ toYaml $cfg }}
{{- end -}}

{{- define "idemproxy.configChecksum" -}}
{{- include "idemproxy.configYaml" . | sha256sum -}}
{{- end -}}
