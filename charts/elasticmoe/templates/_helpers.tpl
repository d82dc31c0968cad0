{{/*
Name of the operator's objects (Deployment, Service, ServiceAccount, Roles): `<release>-operator`,
so the alert webhook is http://<release>-operator.<namespace>.svc:8081/alerts.
Truncated to 63 characters: some Kubernetes name fields are limited to that (DNS labels).
*/}}
{{- define "elasticmoe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Name of cluster-scoped objects (ClusterRoles, ClusterRoleBindings): they share one name space
across the cluster, so the release namespace is part of the name.
*/}}
{{- define "elasticmoe.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "elasticmoe.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "elasticmoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the operator pod. NOTE: app.kubernetes.io/name differs from the
`elasticmoe` of the pods the operator creates, so no selector of theirs (status.selector,
the ServiceMonitor's) ever matches the operator and no selector of the operator matches them.
*/}}
{{- define "elasticmoe.selectorLabels" -}}
app.kubernetes.io/name: elasticmoe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels of every object of the chart.
*/}}
{{- define "elasticmoe.labels" -}}
helm.sh/chart: {{ include "elasticmoe.chart" . }}
{{ include "elasticmoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: elasticmoe
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "elasticmoe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "elasticmoe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image of the operator, also the default image of the pods it creates (`--image`).
*/}}
{{- define "elasticmoe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Namespaces the operator serves in Namespace scope: the release namespace first, then
watch.namespaces without repeats. A JSON list (templates can only return strings).
*/}}
{{- define "elasticmoe.watchedNamespaces" -}}
{{- $namespaces := list .Release.Namespace }}
{{- range .Values.watch.namespaces }}
{{- $namespaces = append $namespaces . }}
{{- end }}
{{- $namespaces | uniq | toJson }}
{{- end }}

{{/*
URL the example Alertmanager receiver posts alerts to: the operator's webhook port.
*/}}
{{/*
The Secret holding the bearer token of the operator's POST /alerts (key `token`): the user's, or
`<release>-operator-alerts`, which templates/alerts-secret.yaml creates.
*/}}
{{- define "elasticmoe.alertsSecretName" -}}
{{- default (printf "%s-alerts" (include "elasticmoe.fullname" .) | trunc 253) .Values.alertmanager.tokenSecret }}
{{- end }}

{{/*
Where the operator container reads that token.
*/}}
{{- define "elasticmoe.alertsTokenFile" -}}
/etc/elasticmoe/alerts/token
{{- end }}

{{- define "elasticmoe.alertsUrl" -}}
{{- default (printf "http://%s.%s.svc:8081/alerts" (include "elasticmoe.fullname" .) .Release.Namespace) .Values.alertmanager.exampleReceiver.url }}
{{- end }}

{{/*
What the operator does in a namespace it serves: reconcile ElasticMoE resources and own their
children (Secret, ConfigMap, coordinator Deployment + Service, worker Pods, and with
networkPolicy.enabled a NetworkPolicy), and record events.
One list for the Roles (Namespace scope) and the ClusterRole (Cluster scope).
*/}}
{{- define "elasticmoe.namespacedRules" -}}
- apiGroups: ["elasticmoe.io"]
  resources: ["elasticmoes"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["elasticmoe.io"]
  resources: ["elasticmoes/status"]
  verbs: ["get", "patch", "update"]
# The children's ownerReferences set blockOwnerDeletion: the OwnerReferencesPermissionEnforcement
# admission plugin lets only those who may update the owner's finalizers set it.
- apiGroups: ["elasticmoe.io"]
  resources: ["elasticmoes/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods", "services", "configmaps", "secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.networkPolicy.enabled }}
# One NetworkPolicy per instance: created, read and patched back to the operator's peers;
# Kubernetes' garbage collector deletes it with its ElasticMoE.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
{{- end }}
{{- end }}

{{/*
`elasticmoe operator --network-policy`: who besides an instance's own pods may reach its
coordinator's http port. The operator is this chart's operator pod, in the release namespace.
*/}}
{{- define "elasticmoe.networkPeers" -}}
{{- $operator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "elasticmoe.selectorLabels" . | fromYaml)) }}
{{- dict "operator" (list $operator) "prometheus" .Values.networkPolicy.prometheus "apiClients" .Values.networkPolicy.apiClients | toJson }}
{{- end }}

{{/*
What kopf reads cluster-wide whatever the scope: it watches CustomResourceDefinitions (to
find the ElasticMoE API) and Namespaces (to match the namespaces it serves).
*/}}
{{- define "elasticmoe.clusterReadRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
