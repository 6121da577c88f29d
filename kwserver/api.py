"""The HTTP API: falcon resources, status codes, body limits and error bodies (spec §7).

Bodies are read and written as bytes with orjson; falcon's media handling is bypassed on this hot
path. Error bodies follow the reference: JSON `{"message", "status"}` on /validate, plain text on
/audit and /validate_raw (except 404 and 500, which are JSON everywhere).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import falcon
import orjson

from kwserver import admission
from kwserver.admission import EvaluationRequest, RequestShapeError
from kwserver.evaluation import EvaluationError, UnknownPolicy
from kwserver.service import AUDIT, VALIDATE, VALIDATE_RAW, AdmissionService

log = logging.getLogger(__name__)

# The Kubernetes API server sends at most 3 MiB; anything larger is not an admission request.
MAX_BODY_BYTES = 3 * 1024 * 1024
# An oversized body up to this size is read and dropped so the keep-alive connection stays usable;
# beyond it the connection is simply closed.
MAX_DRAINED_BYTES = 16 * 1024 * 1024
JSON_CONTENT_TYPE = "application/json"


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_CONTENT_TYPE or (media.startswith("application/") and media.endswith("+json"))


def read_json_body(req: falcon.Request) -> Any:
    if not _is_json_media_type(req.content_type):
        raise HTTPProblem(415, "Expected request with `Content-Type: application/json`")
    length = req.content_length
    if length is not None and length > MAX_BODY_BYTES:
        _drain(req, length)
        raise HTTPProblem(413, "Failed to buffer the request body: length limit exceeded")
    body = req.bounded_stream.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise HTTPProblem(413, "Failed to buffer the request body: length limit exceeded")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPProblem(400, f"Failed to parse the request body as JSON: {exc}") from exc


def _drain(req: falcon.Request, length: int) -> None:
    if length <= MAX_DRAINED_BYTES:
        while req.bounded_stream.read(1024 * 1024):
            pass


def _json_problem(resp: falcon.Response, status: int, message: str) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"message": message, "status": status})


def _text_problem(resp: falcon.Response, status: int, message: str) -> None:
    resp.status = status
    resp.content_type = "text/plain; charset=utf-8"
    resp.data = message.encode()


class AdmissionResource:
    """POST /validate/{policy_id}, /audit/{policy_id} and /validate_raw/{policy_id}."""

    def __init__(self, service: AdmissionService, origin: str):
        self.service = service
        self.origin = origin
        self.parse: Callable[[Any], EvaluationRequest] = (
            admission.parse_raw_review if origin == VALIDATE_RAW else admission.parse_admission_review
        )
        self.envelope = admission.raw_envelope if origin == VALIDATE_RAW else admission.review_envelope
        # Only /validate wraps its client errors in JSON, as the reference does.
        self.problem = _json_problem if origin == VALIDATE else _text_problem

    def on_post(self, req: falcon.Request, resp: falcon.Response, policy_id: str) -> None:
        try:
            doc = read_json_body(req)
            try:
                request = self.parse(doc)
            except RequestShapeError as exc:
                raise HTTPProblem(
                    422, f"Failed to deserialize the JSON body into the target type: {exc}"
                ) from exc
            response = self.service.review(policy_id, request, self.origin)
        except HTTPProblem as problem:
            self.problem(resp, problem.status, problem.message)
            return
        except UnknownPolicy as exc:
            _json_problem(resp, 404, str(exc))
            return
        except EvaluationError as exc:
            log.error("Evaluation error: %s", exc)
            _json_problem(resp, 500, "Something went wrong")
            return
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(self.envelope(response))


def _empty_not_found(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    resp.status = falcon.HTTP_404
    resp.data = b""


def _empty_method_not_allowed(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError,
                              params: dict) -> None:
    resp.status = falcon.HTTP_405
    resp.set_headers(ex.headers or {})
    resp.data = b""


def _unexpected_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    # Whatever happens, the worker survives and the client gets an answer.
    log.exception("unexpected error while serving %s %s", req.method, req.path)
    _json_problem(resp, 500, "Something went wrong")


def create_app(service: AdmissionService) -> falcon.App:
    app = falcon.App(media_type=falcon.MEDIA_JSON)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route("/validate/{policy_id}", AdmissionResource(service, VALIDATE))
    app.add_route("/audit/{policy_id}", AdmissionResource(service, AUDIT))
    app.add_route("/validate_raw/{policy_id}", AdmissionResource(service, VALIDATE_RAW))
    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPRouteNotFound, _empty_not_found)
    app.add_error_handler(falcon.HTTPNotFound, _empty_not_found)
    app.add_error_handler(falcon.HTTPMethodNotAllowed, _empty_method_not_allowed)
    return app
