{{/*
Names, labels and the settings several templates share.
*/}}

{{- define "samtrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name. Kubernetes names are at most 63 characters, and the
longest suffix added to it is "-coordinator" (12), so it is cut at 50.
*/}}
{{- define "samtrain.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "samtrain.coordinatorName" -}}
{{- printf "%s-coordinator" (include "samtrain.fullname" .) }}
{{- end }}

{{/* The workers' StatefulSet and their headless Service share this name. */}}
{{- define "samtrain.workersName" -}}
{{- printf "%s-workers" (include "samtrain.fullname" .) }}
{{- end }}

{{/* The etcd StatefulSet and its headless Service share this name. */}}
{{- define "samtrain.etcdName" -}}
{{- printf "%s-etcd" (include "samtrain.fullname" .) }}
{{- end }}

{{- define "samtrain.jobsName" -}}
{{- printf "%s-jobs" (include "samtrain.fullname" .) }}
{{- end }}

{{- define "samtrain.objectStoreSecretName" -}}
{{- printf "%s-object-store" (include "samtrain.fullname" .) }}
{{- end }}

{{- define "samtrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "samtrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "samtrain.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every resource's labels; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "samtrain.labels" -}}
helm.sh/chart: {{ include "samtrain.chart" .ctx }}
{{ include "samtrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: samtrain
{{- end }}

{{- define "samtrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "samtrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "samtrain.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "<service>.<namespace>.svc.<clusterDomain>" */}}
{{- define "samtrain.serviceDomain" -}}
{{- printf "%s.%s.svc.%s" .service .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* The URL workers and the CLI reach the leading coordinator at. */}}
{{- define "samtrain.coordinatorURL" -}}
{{- printf "http://%s:%d" (include "samtrain.serviceDomain" (dict "ctx" . "service" (include "samtrain.coordinatorName" .))) (int .Values.coordinator.port) }}
{{- end }}

{{/*
etcd client URLs, comma-separated: every bundled member by its stable name,
or the external endpoints; empty with etcd.mode "none".
*/}}
{{- define "samtrain.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "bundled" }}
{{- $name := include "samtrain.etcdName" . }}
{{- $domain := include "samtrain.serviceDomain" (dict "ctx" . "service" $name) }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.bundled.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s:2379" $name $i $domain) }}
{{- end }}
{{- join "," $urls }}
{{- else if eq .Values.etcd.mode "external" }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Environment every samtrain container gets: its pod's identity and logs. */}}
{{- define "samtrain.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: RUST_LOG
  value: {{ .Values.log.level | quote }}
{{- end }}

{{/* The store settings coordinators and workers share. */}}
{{- define "samtrain.etcdEnv" -}}
{{- with include "samtrain.etcdEndpoints" . }}
- name: SAMTRAIN_ETCD
  value: {{ . | quote }}
- name: SAMTRAIN_ETCD_PREFIX
  value: {{ $.Values.etcd.prefix | quote }}
{{- end }}
{{- end }}

{{/* Object-store settings: plain variables, then the Secret as envFrom. */}}
{{- define "samtrain.objectStoreEnv" -}}
{{- range $key, $value := .Values.objectStore.env }}
- name: {{ $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{- define "samtrain.objectStoreEnvFrom" -}}
{{- if .Values.objectStore.existingSecret }}
- secretRef:
    name: {{ .Values.objectStore.existingSecret }}
{{- else if .Values.objectStore.credentials }}
- secretRef:
    name: {{ include "samtrain.objectStoreSecretName" . }}
{{- end }}
{{- end }}

{{/* Pods run as the image's unprivileged user. */}}
{{- define "samtrain.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "samtrain.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
The given affinity, or else a preference for spreading the component's pods
over nodes; call with (dict "ctx" $ "component" "etcd" "affinity" .Values...).
*/}}
{{- define "samtrain.affinity" -}}
{{- if .affinity }}
{{- toYaml .affinity }}
{{- else }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "samtrain.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/*
Checks across values that the schema cannot express clearly; the schema
checks each value on its own.
*/}}
{{- define "samtrain.validate" -}}
{{- if and (eq .Values.etcd.mode "none") (gt (int .Values.coordinator.replicas) 1) }}
{{- fail (printf "coordinator.replicas is %d but etcd.mode is \"none\": the embedded store lives inside one coordinator process, so more than one replica needs etcd.mode \"bundled\" or \"external\"" (int .Values.coordinator.replicas)) }}
{{- end }}
{{- if and (eq .Values.etcd.mode "external") (not .Values.etcd.external.endpoints) }}
{{- fail "etcd.mode is \"external\" but etcd.external.endpoints is empty: list the etcd client URLs, e.g. [\"http://etcd-0.etcd:2379\"]" }}
{{- end }}
{{- if and .Values.objectStore.existingSecret .Values.objectStore.credentials }}
{{- fail "objectStore.existingSecret and objectStore.credentials are both set: give the credentials one way only" }}
{{- end }}
{{- if and (eq .Values.workers.device "cuda") (eq (int .Values.workers.gpus) 0) }}
{{- fail "workers.device is \"cuda\" but workers.gpus is 0: request at least one nvidia.com/gpu per worker, or use device \"auto\" or \"cpu\"" }}
{{- end }}
{{- if and (eq .Values.workers.device "cpu") (gt (int .Values.workers.gpus) 0) }}
{{- fail (printf "workers.device is \"cpu\" but workers.gpus is %d: the GPUs would sit idle; set workers.gpus to 0, or device to \"auto\" or \"cuda\"" (int .Values.workers.gpus)) }}
{{- end }}
{{- end }}

{{- define "samtrain.authSecretName" -}}
{{- default (printf "%s-auth" (include "samtrain.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The token files a pod reads: call with (dict "ctx" $ "keys" (list "worker-tokens")). */}}
{{- define "samtrain.authVolume" -}}
{{- if .ctx.Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "samtrain.authSecretName" .ctx }}
    defaultMode: 0444
    items:
      {{- range .keys }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- end }}

{{- define "samtrain.authMount" -}}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: /etc/samtrain/auth
  readOnly: true
{{- end }}
{{- end }}

{{/* The token a client presents: call with (dict "ctx" $ "key" "operator-tokens"). */}}
{{- define "samtrain.tokenEnv" -}}
{{- if .ctx.Values.auth.enabled }}
- name: SAMTRAIN_TOKEN_FILE
  value: /etc/samtrain/auth/{{ .key }}
{{- end }}
{{- end }}
