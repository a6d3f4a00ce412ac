{{/*
The idemproxy container, for this chart's Deployment and for an agent pod's
sidecar alike. Takes (dict "Values" ... "Release" ...).
*/}}
{{/* Port names: in an agent's pod they carry an "idem-" prefix, clear of the agent's own. */}}
{{- define "idemproxy.adminPortName" -}}
{{- ternary "idem-admin" "admin" (eq .Values.mode "sidecar") -}}
{{- end -}}

{{- define "idemproxy.metricsPortName" -}}
{{- ternary "idem-metrics" "metrics" (eq .Values.mode "sidecar") -}}
{{- end -}}

{{- define "idemproxy.container" -}}
{{- $v := .Values -}}
{{- $sidecar := eq $v.mode "sidecar" -}}
{{- $admin := include "idemproxy.adminPortName" . -}}
{{- $metrics := include "idemproxy.metricsPortName" . -}}
- name: idemproxy
  image: {{ include "idemproxy.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if and $sidecar $v.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args:
    - --config
    - /etc/idemproxy/config.yaml
    - --workers
    - {{ int $v.workers | quote }}
  env:
    # The image's IDEMPROXY_* defaults would win over the file: set them to what the file says.
    - name: IDEMPROXY_LISTEN
      value: {{ include "idemproxy.listen" . | quote }}
    - name: IDEMPROXY_ADMIN_LISTEN
      value: {{ include "idemproxy.adminListen" . | quote }}
    - name: IDEMPROXY_METRICS_LISTEN
      value: {{ include "idemproxy.metricsListen" . | quote }}
    {{- if $v.store.existingSecret.name }}
    - name: IDEMPROXY_STORE
      valueFrom:
        secretKeyRef:
          name: {{ $v.store.existingSecret.name }}
          key: {{ $v.store.existingSecret.key }}
    {{- end }}
    {{- with $v.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    {{- if not $sidecar }}
    - name: proxy
      containerPort: {{ int $v.ports.proxy }}
      protocol: TCP
    {{- end }}
    # /metrics, /healthz and /readyz: the probes below and the Service/PodMonitor.
    - name: {{ $metrics }}
      containerPort: {{ int $v.ports.metrics }}
      protocol: TCP
    {{- /* On loopback (the default) the operations API is not reachable from outside the pod: no port to declare. */}}
    {{- if include "idemproxy.adminExposed" . }}
    - name: {{ $admin }}
      containerPort: {{ int $v.ports.admin }}
      protocol: TCP
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: {{ $metrics }}
    periodSeconds: {{ int $v.probes.startup.periodSeconds }}
    failureThreshold: {{ int $v.probes.startup.failureThreshold }}
    timeoutSeconds: {{ int $v.probes.startup.timeoutSeconds }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $metrics }}
    periodSeconds: {{ int $v.probes.liveness.periodSeconds }}
    failureThreshold: {{ int $v.probes.liveness.failureThreshold }}
    timeoutSeconds: {{ int $v.probes.liveness.timeoutSeconds }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $metrics }}
    periodSeconds: {{ int $v.probes.readiness.periodSeconds }}
    failureThreshold: {{ int $v.probes.readiness.failureThreshold }}
    timeoutSeconds: {{ int $v.probes.readiness.timeoutSeconds }}
  {{- if and (gt (int $v.preStopSleepSeconds) 0) (not (and $sidecar $v.sidecar.native)) }}
  lifecycle:
    # Keep serving while the endpoint is removed everywhere; then SIGTERM drains.
    preStop:
      exec:
        command: ["sleep", {{ int $v.preStopSleepSeconds | quote }}]
  {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: idemproxy-config
      mountPath: /etc/idemproxy
      readOnly: true
    # The root filesystem is read-only: scratch space (--workers N keeps its metrics here)
    - name: idemproxy-tmp
      mountPath: /tmp
    # and the working directory (the SQLite ledger, when that is the store).
    - name: idemproxy-data
      mountPath: /var/lib/idemproxy
    {{- range $index, $mount := $v.secretMounts }}
    - name: {{ printf "idemproxy-secret-%d" $index }}
      mountPath: {{ $mount.mountPath }}
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "idemproxy.volumes" -}}
- name: idemproxy-config
  configMap:
    name: {{ include "idemproxy.fullname" . }}
- name: idemproxy-tmp
  emptyDir: {}
- name: idemproxy-data
  emptyDir: {}
{{- range $index, $mount := .Values.secretMounts }}
- name: {{ printf "idemproxy-secret-%d" $index }}
  secret:
    secretName: {{ $mount.secretName }}
{{- end }}
{{- end -}}
