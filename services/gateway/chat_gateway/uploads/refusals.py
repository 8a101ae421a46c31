"""What an upload or download may tell its client, and the one place where everything else
is turned into client text.

Refusals the gateway makes itself (a missing field, a wrong id, a body too large) are raised as
the classes below, whose message is written for the client. Errors of internal calls carry the
internal service's own text ("Validation failed for POST /v1/sessions", a storage error): only
a few kinds, whose text the files service writes for end users (type not accepted, too large,
over quota), pass through; every other one becomes a fixed text for its status, and the
internal text goes to the log.
"""
from __future__ import annotations

import logging

from chat_common import errors

logger = logging.getLogger(__name__)


class ClientText:
    """Marks an AppError whose message is meant for the client."""


class BadUpload(ClientText, errors.BadRequestError):
    pass


class UploadForbidden(ClientText, errors.ForbiddenError):
    pass


class UploadNotFound(ClientText, errors.NotFoundError):
    pass


class UploadTooLarge(ClientText, errors.PayloadTooLargeError):
    pass


# internal errors whose text the files service writes for the uploader
_PASSED_ON = (errors.UnsupportedMediaTypeError, errors.PayloadTooLargeError, errors.QuotaExceededError)

UNAVAILABLE = "file storage is unavailable, try again later"
_BY_STATUS = {
    400: "the upload could not be accepted",
    401: "missing or refused token",
    403: "not allowed",
    404: "not found",
    409: "the upload conflicts with another one; try again",
    413: "the upload is too large",
    415: "this type of file is not accepted",
    429: "too many requests; slow down",
}


def client_failure(exc: errors.AppError) -> tuple[int, str]:
    """The status and message a client gets for ``exc``."""
    if isinstance(exc, ClientText):
        return exc.status_code, exc.message
    status = exc.status_code
    if status >= 500:
        logger.warning("upload failed: %s", exc.message)
        return 503, UNAVAILABLE
    if isinstance(exc, _PASSED_ON):
        return status, exc.message
    logger.info("internal call refused the upload: %s", exc.message[:300], extra={"status": status})
    return status, _BY_STATUS.get(status, _BY_STATUS[400])
