"""The run around the steps: typed config, the session that starts or connects the services, the
prompt stream, checkpoints and resume, Prometheus metrics."""
