"""The HTTP ceiling: a minimal falcon app that answers every POST with a canned AdmissionReview.

It reads the whole request body (as any webhook must) and returns fixed bytes: no JSON decoding, no
policy. Served by gunicorn with kwserver's settings (bench/servers.py), it measures what HTTP,
gunicorn and falcon alone cost on this machine: no admission server in Python can be faster.
"""

from __future__ import annotations

import falcon
import falcon.asgi

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


class AsyncCanned:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, **params: str) -> None:
        await req.bounded_stream.read()
        resp.content_type = falcon.MEDIA_JSON
        resp.data = CANNED


def _routes(app: falcon.App, resource: object) -> falcon.App:
    for prefix in ("validate", "audit", "validate_raw"):
        app.add_route(f"/{prefix}/{{policy_id}}", resource)
    return app


def create_app() -> falcon.App:
    return _routes(falcon.App(), Canned())


def create_asgi_app() -> falcon.asgi.App:
    """The same app for ASGI servers (uvicorn), to compare HTTP stacks."""
    return _routes(falcon.asgi.App(), AsyncCanned())


app = create_app()
asgi_app = create_asgi_app()
mark_worker_ready()
