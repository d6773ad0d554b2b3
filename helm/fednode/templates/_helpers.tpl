{{/*
Names, labels and the checks that need more than one value (values.schema.json checks
each value on its own).
*/}}

{{- define "fednode.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The node's name: its runs carry it in the fednode.io/node label. */}}
{{- define "fednode.nodeName" -}}
{{- .Values.nodeName | default .Release.Name -}}
{{- end -}}

{{/* Where the node and its runs live. */}}
{{- define "fednode.namespace" -}}
{{- .Values.namespace.name | default .Release.Namespace -}}
{{- end -}}

{{- define "fednode.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{- define "fednode.labels" -}}
{{ include "fednode.selectorLabels" . }}
app.kubernetes.io/part-of: fednode
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The labels every run of this node carries (executors/base.py run_labels). */}}
{{- define "fednode.runSelector" -}}
app.kubernetes.io/managed-by: fednode
fednode.io/node: {{ include "fednode.nodeName" . }}
{{- end -}}

{{/* The runs' NetworkPolicies' name prefix (policies/network.py policy_name_prefix). */}}
{{- define "fednode.runsPolicyPrefix" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (printf "fednode-runs-%s" (include "fednode.nodeName" .) | lower) "-" | trunc 40 | trimAll "-" -}}
{{- end -}}

{{/* A network database's egress policy name (policies/network.py database_policy_name);
args: (list prefix label). */}}
{{- define "fednode.databasePolicyName" -}}
{{- $prefix := index . 0 }}{{ $label := index . 1 -}}
{{- printf "%s-db-%s" $prefix (regexReplaceAll "[^a-z0-9-]+" (lower $label) "-") | trunc 63 | trimAll "-" -}}
{{- end -}}

{{- define "fednode.secretName" -}}
{{- .Values.existingSecret | default (include "fednode.fullname" .) -}}
{{- end -}}

{{- define "fednode.taskClaim" -}}
{{- .Values.taskVolume.existingClaim | default (printf "%s-tasks" (include "fednode.fullname" .)) -}}
{{- end -}}

{{- define "fednode.proxyService" -}}
{{- printf "%s-proxy" (include "fednode.fullname" .) -}}
{{- end -}}

{{/* The claim a hostPath database is mounted through. */}}
{{- define "fednode.databaseClaim" -}}
{{- $root := index . 0 -}}{{- $db := index . 1 -}}
{{- if $db.claim -}}
{{- $db.claim -}}
{{- else if $db.hostPath -}}
{{- printf "%s-db-%s" (include "fednode.fullname" $root) ($db.label | lower | replace "_" "-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A list of whole numbers as a YAML list of integers. */}}
{{- define "fednode.ints" -}}
{{- $out := list -}}
{{- range . }}{{ $out = append $out (int .) }}{{ end -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "fednode.isFileDatabase" -}}
{{- if has .type (list "csv" "parquet" "excel" "folder") -}}true{{- end -}}
{{- end -}}

{{/* Checks across values; each fails with what to set. */}}
{{- define "fednode.validate" -}}
{{- if not .Values.server.url -}}
{{- fail "server.url is required: the vantage6 server's scheme and host, e.g. --set server.url=https://server.example.org" -}}
{{- end -}}
{{- if and (not .Values.apiKey) (not .Values.existingSecret) -}}
{{- fail "apiKey or existingSecret is required: the node's API key from the server (--set apiKey=... or a Secret of yours with key secretKeys.apiKey)" -}}
{{- end -}}
{{- if and .Values.apiKey .Values.existingSecret -}}
{{- fail "give apiKey or existingSecret, not both" -}}
{{- end -}}
{{- if and .Values.encryption.enabled (not .Values.encryption.privateKey) (not .Values.existingSecret) -}}
{{- fail "encryption.enabled needs the organization's private key: encryption.privateKey (PEM, e.g. --set-file encryption.privateKey=key.pem) or key secretKeys.privateKey of existingSecret" -}}
{{- end -}}
{{- if and .Values.encryption.privateKey (not (contains "PRIVATE KEY" .Values.encryption.privateKey)) -}}
{{- fail "encryption.privateKey is not a PEM private key (expected a -----BEGIN ... PRIVATE KEY----- block)" -}}
{{- end -}}
{{- if and .Values.namespace.create (not .Values.namespace.name) -}}
{{- fail "namespace.create needs namespace.name (the release namespace exists already: to use it, set namespace.create=false and label it pod-security.kubernetes.io/enforce=restricted)" -}}
{{- end -}}
{{- if and .Values.namespace.create (eq .Values.namespace.name .Release.Namespace) -}}
{{- fail (printf "namespace.name %q is the release namespace, which exists already: set namespace.create=false (and label it pod-security.kubernetes.io/enforce=restricted), or choose another namespace.name" .Values.namespace.name) -}}
{{- end -}}
{{- $labels := dict -}}
{{- range .Values.databases -}}
{{- if hasKey $labels .label -}}
{{- fail (printf "databases: label %q is used twice" .label) -}}
{{- end -}}
{{- $_ := set $labels .label true -}}
{{- if include "fednode.isFileDatabase" . -}}
{{- $sources := 0 -}}
{{- if .claim }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .hostPath }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .configMap }}{{ $sources = add1 $sources }}{{ end -}}
{{- if ne $sources 1 -}}
{{- fail (printf "databases[%s]: a %s database needs exactly one of claim, hostPath, configMap" .label .type) -}}
{{- end -}}
{{- if and (ne .type "folder") (not .file) -}}
{{- fail (printf "databases[%s]: a %s database needs file (the file's name in its volume)" .label .type) -}}
{{- end -}}
{{- if and .subPath (not .claim) -}}
{{- fail (printf "databases[%s]: subPath only applies to a claim" .label) -}}
{{- end -}}
{{- if .egress -}}
{{- fail (printf "databases[%s]: egress only applies to network databases (sql, sparql, omop)" .label) -}}
{{- end -}}
{{- else -}}
{{- if not .uri -}}
{{- fail (printf "databases[%s]: a %s database needs uri" .label .type) -}}
{{- end -}}
{{- if or .claim .hostPath .configMap -}}
{{- fail (printf "databases[%s]: a %s database is not a file: give uri, not a volume" .label .type) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
