{{/* Whether the prometheus-operator CRDs can be used (or are assumed to be). */}}
{{- define "idemproxy.monitoringCRDs" -}}
{{- if or .Values.monitoring.assumeCRDs (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}true{{- end -}}
{{- end -}}
