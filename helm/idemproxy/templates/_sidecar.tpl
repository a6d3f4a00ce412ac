{{/*
Sidecar mode: templates another chart includes to put idemproxy into its agent's
pod. That chart lists this one as a dependency with mode: sidecar and calls each
template with (dict "Values" .Values.idemproxy "Release" .Release):

  template:
    metadata:
      labels:
        {{- include "idemproxy.sidecar.podLabels" $idem | nindent 8 }}
      annotations:
        {{- include "idemproxy.sidecar.podAnnotations" $idem | nindent 8 }}
    spec:
      initContainers:
        {{- include "idemproxy.sidecar.initContainers" $idem | nindent 8 }}
      containers:
        - name: agent
          env:
            - name: TOOL_URL
              value: {{ include "idemproxy.sidecar.url" $idem }}
        {{- include "idemproxy.sidecar.containers" $idem | nindent 8 }}
      volumes:
        {{- include "idemproxy.sidecar.volumes" $idem | nindent 8 }}

initContainers / containers: the container lands in exactly one of them, by
sidecar.native (a native sidecar is an init container with restartPolicy Always).
Both may be included unconditionally. helm/examples/agent is a complete example.
*/}}

{{- define "idemproxy.sidecar.check" -}}
{{- if ne .Values.mode "sidecar" -}}
{{- fail "idemproxy: the idemproxy.sidecar.* templates need the dependency's values to say mode: sidecar" -}}
{{- end -}}
{{- include "idemproxy.validate" . -}}
{{- end -}}

{{- define "idemproxy.sidecar.initContainers" -}}
{{- include "idemproxy.sidecar.check" . -}}
{{- if .Values.sidecar.native -}}
{{ include "idemproxy.container" . }}
{{- end -}}
{{- end -}}

{{- define "idemproxy.sidecar.containers" -}}
{{- include "idemproxy.sidecar.check" . -}}
{{- if not .Values.sidecar.native -}}
{{ include "idemproxy.container" . }}
{{- end -}}
{{- end -}}

{{/* The config volume and the scratch volumes the container mounts. */}}
{{- define "idemproxy.sidecar.volumes" -}}
{{- include "idemproxy.sidecar.check" . -}}
{{ include "idemproxy.volumes" . }}
{{- end -}}

{{/* The label the PodMonitor selects pods by. */}}
{{- define "idemproxy.sidecar.podLabels" -}}
{{- include "idemproxy.sidecar.check" . -}}
idemproxy/sidecar: {{ include "idemproxy.fullname" . }}
{{- end -}}

{{/* Rolls the agent's pods when the proxy configuration changes. */}}
{{- define "idemproxy.sidecar.podAnnotations" -}}
{{- include "idemproxy.sidecar.check" . -}}
checksum/idemproxy-config: {{ include "idemproxy.configChecksum" . }}
{{- end -}}

{{/* Where the agent reaches the proxy. */}}
{{- define "idemproxy.sidecar.url" -}}
{{- include "idemproxy.sidecar.check" . -}}
{{- $host := .Values.sidecar.listenHost -}}
{{- if contains ":" $host -}}
{{- printf "http://[%s]:%d" $host (int .Values.ports.proxy) -}}
{{- else -}}
{{- printf "http://%s:%d" $host (int .Values.ports.proxy) -}}
{{- end -}}
{{- end -}}
