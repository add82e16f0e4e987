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
{{- printf "%s://%s:%d" (ternary "https" "http" .Values.tls.enabled) (include "samtrain.serviceDomain" (dict "ctx" . "service" (include "samtrain.coordinatorName" .))) (int .Values.coordinator.port) }}
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
{{- $urls = append $urls (printf "%s://%s-%d.%s:2379" (ternary "https" "http" $.Values.etcd.bundled.tls) $name $i $domain) }}
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
{{- with .Values.log.otlpEndpoint }}
- name: SAMTRAIN_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The store settings coordinators and workers share. */}}
{{- define "samtrain.etcdEnv" -}}
{{- with include "samtrain.etcdEndpoints" . }}
- name: SAMTRAIN_ETCD
  value: {{ . | quote }}
- name: SAMTRAIN_ETCD_PREFIX
  value: {{ $.Values.etcd.prefix | quote }}
{{- end }}
{{- include "samtrain.etcdAccessEnv" . }}
{{- end }}

{{/* etcd's TLS files and user, as files mounted by etcdMount. */}}
{{- define "samtrain.etcdAccessEnv" -}}
{{- $access := include "samtrain.etcdAccess" . | fromYaml }}
{{- if $access.ca }}
- name: SAMTRAIN_ETCD_CA
  value: /etc/samtrain/etcd/ca.crt
{{- end }}
{{- if $access.cert }}
- name: SAMTRAIN_ETCD_CERT
  value: /etc/samtrain/etcd/tls.crt
- name: SAMTRAIN_ETCD_KEY
  value: /etc/samtrain/etcd/tls.key
{{- end }}
{{- with $access.user }}
- name: SAMTRAIN_ETCD_USER
  value: {{ . | quote }}
- name: SAMTRAIN_ETCD_PASSWORD_FILE
  value: /etc/samtrain/etcd/password
{{- end }}
{{- end }}

{{/*
What samtrain's pods need to reach etcd, as YAML: the Secret holding it and
which of ca.crt, a client certificate and a user apply.
*/}}
{{- define "samtrain.etcdAccess" -}}
{{- if eq .Values.etcd.mode "bundled" }}
secret: {{ include "samtrain.etcdName" . }}-credentials
ca: {{ .Values.etcd.bundled.tls }}
cert: {{ .Values.etcd.bundled.tls }}
user: {{ ternary "root" "" .Values.etcd.bundled.auth | quote }}
{{- else if and (eq .Values.etcd.mode "external") .Values.etcd.external.existingSecret }}
secret: {{ .Values.etcd.external.existingSecret }}
ca: {{ contains "https://" (join "," .Values.etcd.external.endpoints) }}
cert: {{ .Values.etcd.external.clientCertificate }}
user: {{ .Values.etcd.external.user | quote }}
{{- end }}
{{- end }}

{{/* The etcd credentials volume, its files named as etcdEnv expects. */}}
{{- define "samtrain.etcdVolume" -}}
{{- $access := include "samtrain.etcdAccess" . | fromYaml }}
{{- if or $access.ca $access.cert $access.user }}
- name: etcd-credentials
  secret:
    secretName: {{ $access.secret }}
    defaultMode: 0444
    items:
      {{- if $access.ca }}
      - key: ca.crt
        path: ca.crt
      {{- end }}
      {{- if $access.cert }}
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- end }}
      {{- if $access.user }}
      - key: password
        path: password
      {{- end }}
{{- end }}
{{- end }}

{{- define "samtrain.etcdMount" -}}
{{- $access := include "samtrain.etcdAccess" . | fromYaml }}
{{- if or $access.ca $access.cert $access.user }}
- name: etcd-credentials
  mountPath: /etc/samtrain/etcd
  readOnly: true
{{- end }}
{{- end }}

{{- define "samtrain.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "samtrain.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
TLS files: the CA; the coordinator's certificate for role "server"; under
mutual TLS, the clients' certificate (the coordinator's pod too, for the CLI
run in it). Call with (dict "ctx" $ "role" "server").
*/}}
{{- define "samtrain.tlsVolume" -}}
{{- $v := .ctx.Values.tls }}
{{- if $v.enabled }}
- name: tls
  projected:
    defaultMode: 0444
    sources:
      - secret:
          name: {{ include "samtrain.tlsSecretName" .ctx }}
          items:
            - key: ca.crt
              path: ca.crt
            {{- if eq .role "server" }}
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
            {{- end }}
            {{- if and $v.mutual (not $v.existingSecret) }}
            - key: client.crt
              path: client.crt
            - key: client.key
              path: client.key
            {{- end }}
      {{- if and $v.mutual $v.existingSecret }}
      - secret:
          name: {{ $v.clientSecret }}
          items:
            - key: tls.crt
              path: client.crt
            - key: tls.key
              path: client.key
      {{- end }}
{{- end }}
{{- end }}

{{- define "samtrain.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/samtrain/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* A client's TLS settings (workers, the submit hook, the CLI in a pod). */}}
{{- define "samtrain.tlsClientEnv" -}}
{{- if .Values.tls.enabled }}
- name: SAMTRAIN_TLS_CA
  value: /etc/samtrain/tls/ca.crt
{{- if .Values.tls.mutual }}
- name: SAMTRAIN_TLS_CLIENT_CERT
  value: /etc/samtrain/tls/client.crt
- name: SAMTRAIN_TLS_CLIENT_KEY
  value: /etc/samtrain/tls/client.key
{{- end }}
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
{{- if and .Values.tls.enabled .Values.tls.mutual .Values.tls.existingSecret (not .Values.tls.clientSecret) }}
{{- fail "tls.mutual is true with tls.existingSecret: name the clients' certificate Secret (tls.crt, tls.key) in tls.clientSecret" }}
{{- end }}
{{- if and (eq .Values.etcd.mode "external") (or .Values.etcd.external.user .Values.etcd.external.clientCertificate) (not .Values.etcd.external.existingSecret) }}
{{- fail "etcd.external.user or etcd.external.clientCertificate is set but etcd.external.existingSecret is empty: name the Secret with the password, tls.crt and tls.key" }}
{{- end }}
{{- if and (eq .Values.etcd.mode "external") (not .Values.etcd.external.endpoints) }}
{{- fail "etcd.mode is \"external\" but etcd.external.endpoints is empty: list the etcd client URLs, e.g. [\"http://etcd-0.etcd:2379\"]" }}
{{- end }}
{{- if and .Values.objectStore.existingSecret .Values.objectStore.credentials }}
{{- fail "objectStore.existingSecret and objectStore.credentials are both set: give the credentials one way only" }}
{{- end }}
{{- if hasKey .Values.workers "gpus" }}
{{- fail "workers.gpus was renamed workers.gpusPerPod (nvidia.com/gpu per worker pod)" }}
{{- end }}
{{- if and (eq .Values.workers.device "cuda") (eq (int .Values.workers.gpusPerPod) 0) }}
{{- fail "workers.device is \"cuda\" but workers.gpusPerPod is 0: request at least one nvidia.com/gpu per worker, or use device \"auto\" or \"cpu\"" }}
{{- end }}
{{- if and (eq .Values.workers.device "cpu") (gt (int .Values.workers.gpusPerPod) 0) }}
{{- fail (printf "workers.device is \"cpu\" but workers.gpusPerPod is %d: the GPUs would sit idle; set workers.gpusPerPod to 0, or device to \"auto\" or \"cuda\"" (int .Values.workers.gpusPerPod)) }}
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

{{/* `/metrics` asks scrapers for the token in the auth Secret. */}}
{{- define "samtrain.metricsEnv" -}}
{{- if .Values.auth.enabled }}
- name: SAMTRAIN_METRICS_TOKEN_FILE
  value: /etc/samtrain/auth/metrics-token
{{- end }}
{{- end }}

{{/* Annotations for annotation-based scraping: call with (dict "ctx" $ "port" N). */}}
{{- define "samtrain.scrapeAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
