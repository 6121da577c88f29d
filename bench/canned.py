"""The HTTP ceiling: a minimal falcon app that answers every POST with a canned AdmissionReview.

It reads the whole request body (as any webhook must) and returns fixed bytes: no JSON decoding, no
policy. Served by gunicorn with kwserver's settings (bench/servers.py), it measures what HTTP,
gunicorn and falcon alone cost on this machine: no admission server in Python can be faster.
"""

from __future__ import annotations

import falcon

from bench._ready import mark_worker_ready

CANNED = (
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":'
    b'{"uid":"1299d386-525b-4032-98ae-1949f69f9cfc","allowed":true,"auditAnnotations":null,"warnings":null}}'
)


class Canned:
    def on_post(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        req.bounded_stream.read()
        resp.content_type = falcon.MEDIA_JSON
        resp.data = CANNED


def create_app() -> falcon.App:
    app = falcon.App()
    canned = Canned()
    for prefix in ("validate", "audit", "validate_raw"):
        app.add_route(f"/{prefix}/{{policy_id}}", canned)
    return app


app = create_app()
mark_worker_ready()
