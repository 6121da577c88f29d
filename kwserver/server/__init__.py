"""The server: gunicorn's master and workers, the HTTP API and the admission pipeline behind it.

`daemon` owns the process lifecycle (load, reload, the master's services, fork); `gunicorn_config`
holds gunicorn's settings and hooks; `worker` is the event-loop HTTP worker; `api` the falcon app;
`service` the pipeline of one request; `autoscaler` the worker pool; `tls` rotating TLS contexts.
"""
