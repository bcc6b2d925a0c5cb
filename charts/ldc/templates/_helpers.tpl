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
  - name: store
    hostPath:
      path: {{ .Values.store.hostPath }}
      type: DirectoryOrCreate
{{- end }}
{{- end -}}

{{- define "ldc.storeMount" -}}
{{- if and .Values.store.hostPath (not (hasPrefix "tikv://" .Values.store.spec)) }}
volumeMounts:
  - name: store
    mountPath: {{ .Values.store.hostPath }}
{{- end }}
{{- end -}}
