{{- define "ldc.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ldc.labels" -}}
app.kubernetes.io/part-of: ldc
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "ldc.storeVolume" -}}
{{- if and .Values.store.hostPath (not (hasPrefix "tikv://" .Values.store.spec)) }}
volumes:
  {{- include "ldc.storeVolumeItem" . | nindent 2 }}
{{- end }}
{{- end -}}

{{- /* The store volume as one list item (for pods with other volumes too). */}}
{{- define "ldc.storeVolumeItem" -}}
{{- if and .Values.store.hostPath (not (hasPrefix "tikv://" .Values.store.spec)) }}
- name: store
  hostPath:
    path: {{ .Values.store.hostPath }}
    type: DirectoryOrCreate
{{- end }}
{{- end -}}

{{- define "ldc.storeMount" -}}
{{- if and .Values.store.hostPath (not (hasPrefix "tikv://" .Values.store.spec)) }}
volumeMounts:
  {{- include "ldc.storeMountItem" . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ldc.storeMountItem" -}}
{{- if and .Values.store.hostPath (not (hasPrefix "tikv://" .Values.store.spec)) }}
- name: store
  mountPath: {{ .Values.store.hostPath }}
{{- end }}
{{- end -}}
