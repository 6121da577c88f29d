"""The HTTP API: falcon resources, status codes, body limits and error bodies.

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
from kwserver.admission import EvaluationRequest, RequestShapeError, RequestTooDeep
from kwserver.config import MAX_REQUEST_BODY_BYTES
from kwserver.evaluation import EvaluationError, UnknownPolicy
from kwserver.server.service import AUDIT, VALIDATE, VALIDATE_RAW, AdmissionService
from kwserver.truncation import bounded

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
BODY_TOO_LARGE = "Failed to buffer the request body: length limit exceeded"
SOMETHING_WENT_WRONG = "Something went wrong"
VALIDATE_ROUTE = "/validate/{policy_id}"


def _is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_CONTENT_TYPE or (media.startswith("application/") and media.endswith("+json"))


def read_json_body(req: falcon.Request) -> Any:
    """The request body as JSON; falcon HTTP errors (415, 413, 400) say what is wrong with it."""
    if not _is_json_media_type(req.content_type):
        raise falcon.HTTPUnsupportedMediaType(description="Expected request with `Content-Type: application/json`")
    length = req.content_length
    if length is not None and length > MAX_REQUEST_BODY_BYTES:
        # The worker read none of it: it drops the rest of the body itself (kwserver/server/worker.py).
        raise falcon.HTTPContentTooLarge(description=BODY_TOO_LARGE)
    body = req.bounded_stream.read(MAX_REQUEST_BODY_BYTES + 1)
    if len(body) > MAX_REQUEST_BODY_BYTES:
        raise falcon.HTTPContentTooLarge(description=BODY_TOO_LARGE)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise falcon.HTTPBadRequest(description=f"Failed to parse the request body as JSON: {exc}") from exc


class AdmissionResource:
    """POST /validate/{policy_id}, /audit/{policy_id} and /validate_raw/{policy_id}."""

    def __init__(self, service: AdmissionService, origin: str):
        self.service = service
        self.origin = origin
        self.parse: Callable[[Any], EvaluationRequest] = (
            admission.parse_raw_review if origin == VALIDATE_RAW else admission.parse_admission_review
        )
        self.envelope = admission.raw_envelope if origin == VALIDATE_RAW else admission.review_envelope

    def on_post(self, req: falcon.Request, resp: falcon.Response, policy_id: str) -> None:
        request = self.parse(read_json_body(req))
        response = self.service.review(policy_id, request, self.origin)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(self.envelope(response))


# --- errors: raised anywhere below a responder, rendered here ---------------------------------------

def _json_problem(resp: falcon.Response, status: int, message: str) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"message": bounded(message), "status": status})


def _client_problem(req: falcon.Request, resp: falcon.Response, status: int, message: str) -> None:
    # Only /validate wraps its client errors in JSON, as the reference does; the others answer text.
    if req.uri_template == VALIDATE_ROUTE:
        _json_problem(resp, status, message)
    else:
        resp.status = status
        resp.content_type = "text/plain; charset=utf-8"
        resp.data = bounded(message).encode()


def _http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict) -> None:
    _client_problem(req, resp, ex.status_code, ex.description or ex.title)


def _request_shape_error(req: falcon.Request, resp: falcon.Response, ex: RequestShapeError, params: dict) -> None:
    _client_problem(req, resp, 422, f"Failed to deserialize the JSON body into the target type: {ex}")


def _request_too_deep(req: falcon.Request, resp: falcon.Response, ex: RequestTooDeep, params: dict) -> None:
    _client_problem(req, resp, 400, f"Failed to parse the request body as JSON: {ex}")


def _unknown_policy(req: falcon.Request, resp: falcon.Response, ex: UnknownPolicy, params: dict) -> None:
    _json_problem(resp, 404, str(ex))


def _evaluation_error(req: falcon.Request, resp: falcon.Response, ex: EvaluationError, params: dict) -> None:
    log.error("Evaluation error: %s", ex)
    _json_problem(resp, 500, SOMETHING_WENT_WRONG)


def _unexpected_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    # Whatever happens, the worker survives and the client gets an answer.
    log.exception("unexpected error while serving %s %s", req.method, req.path)
    _json_problem(resp, 500, SOMETHING_WENT_WRONG)


def _empty_not_found(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    resp.status = falcon.HTTP_404
    resp.data = b""


def _empty_method_not_allowed(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError,
                              params: dict) -> None:
    resp.status = falcon.HTTP_405
    resp.set_headers(ex.headers or {})
    resp.data = b""


def create_app(service: AdmissionService) -> falcon.App:
    app = falcon.App(media_type=falcon.MEDIA_JSON)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route(VALIDATE_ROUTE, AdmissionResource(service, VALIDATE))
    app.add_route("/audit/{policy_id}", AdmissionResource(service, AUDIT))
    app.add_route("/validate_raw/{policy_id}", AdmissionResource(service, VALIDATE_RAW))
    # falcon picks the most specific handler for an exception's class.
    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPError, _http_error)
    app.add_error_handler(RequestShapeError, _request_shape_error)
    app.add_error_handler(RequestTooDeep, _request_too_deep)
    app.add_error_handler(UnknownPolicy, _unknown_policy)
    app.add_error_handler(EvaluationError, _evaluation_error)
    app.add_error_handler(falcon.HTTPRouteNotFound, _empty_not_found)
    app.add_error_handler(falcon.HTTPNotFound, _empty_not_found)
    app.add_error_handler(falcon.HTTPMethodNotAllowed, _empty_method_not_allowed)
    return app
