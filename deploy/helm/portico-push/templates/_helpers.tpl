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

{{/* Where Redis is: REDIS_URL from its Secret, or Sentinel's / a Cluster's addresses (in the
ConfigMap, `portico-push.redisConfig`) with the passwords from theirs. */}}
{{- define "portico-push.secretEnv" -}}
{{- $redis := .Values.redis -}}
{{- if eq $redis.mode "node" }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $redis.urlSecret.name }}
      key: {{ $redis.urlSecret.key }}
{{- end }}
{{- if and (ne $redis.mode "node") $redis.passwordSecret.name }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redis.passwordSecret.name }}
      key: {{ $redis.passwordSecret.key }}
{{- end }}
{{- if and (eq $redis.mode "sentinel") $redis.sentinel.passwordSecret.name }}
- name: REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redis.sentinel.passwordSecret.name }}
      key: {{ $redis.sentinel.passwordSecret.key }}
{{- end }}
{{- end -}}

{{- define "portico-push.redisConfig" -}}
{{- $redis := .Values.redis -}}
{{- if eq $redis.mode "sentinel" }}
{{- if or (not $redis.sentinel.addresses) (not $redis.sentinel.masterName) }}
{{- fail "redis.mode sentinel needs redis.sentinel.addresses and redis.sentinel.masterName" }}
{{- end }}
REDIS_SENTINELS: {{ join "," $redis.sentinel.addresses | quote }}
REDIS_SENTINEL_MASTER: {{ $redis.sentinel.masterName | quote }}
{{- else if eq $redis.mode "cluster" }}
{{- if not $redis.cluster.nodes }}
{{- fail "redis.mode cluster needs redis.cluster.nodes" }}
{{- end }}
REDIS_CLUSTER_NODES: {{ join "," $redis.cluster.nodes | quote }}
{{- end }}
{{- end -}}
