"""The `kwserver` command line: `cli` parses it and dispatches to the commands that are not `serve`
(`offline`: kwctl's `run`, with `host_sessions` for recorded host calls; `manifests`; `pull_push`).
"""
