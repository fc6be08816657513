{{/* Names: <release>-gateway, <release>-fetcher ("portico-push" is not repeated). */}}
{{- define "portico-push.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; `component` is gateway or fetcher where there is one. The pods'
app.kubernetes.io/name is portico-push-gateway / -fetcher: the PodMonitor's job, which the alert
rules name. */}}
{{- define "portico-push.labels" -}}
app.kubernetes.io/part-of: portico-push
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "portico-push.selector" -}}
app.kubernetes.io/name: portico-push-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "portico-push.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/portico-push-%s:%s" (trimSuffix "/" .root.Values.image.registry) .component $tag -}}
{{- else -}}
{{- printf "portico-push-%s:%s" .component $tag -}}
{{- end -}}
{{- end -}}

{{/* Grace periods, from the shutdown tables (each service's shutdown.py; tests/test_helm.py checks
them): gateway preStop + DRAIN + flush 5 s + release 5 s; fetcher HTTP 5 + in flight 10 +
release 5. Each with 5 s to spare. */}}
{{- define "portico-push.gatewayGrace" -}}
{{- add (int .Values.gateway.preStopSeconds) (int (ceil .Values.gateway.drainSeconds)) 15 -}}
{{- end -}}
{{- define "portico-push.fetcherGrace" -}}25{{- end -}}

{{- define "portico-push.origins" -}}
{{- if .Values.config.allowedOrigins -}}
{{- join "," .Values.config.allowedOrigins -}}
{{- else if and .Values.ingress.enabled .Values.ingress.host -}}
{{- printf "https://%s" .Values.ingress.host -}}
{{- end -}}
{{- end -}}

{{- define "portico-push.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "portico-push.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "portico-push.secretEnv" -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlSecret.name }}
      key: {{ .Values.redis.urlSecret.key }}
{{- end -}}
