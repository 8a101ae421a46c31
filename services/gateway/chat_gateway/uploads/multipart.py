"""An incremental multipart/form-data reader over python-multipart's ``MultipartParser``.

Bytes go in as they arrive (``feed``); what was recognised comes out as a list of events:
``FileStart``, ``FileData``, ``FileEnd`` for the file part and ``Field`` for each small text
field. Nothing but the small fields is ever kept: file bytes leave in the events of the very
chunk they came in.
"""
from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import (
    MultipartParser,
    MultipartState,
    parse_options_header,
)

from chat_gateway.uploads.refusals import BadUpload, UploadTooLarge

FILE_FIELD = "file"
MAX_BOUNDARY_CHARS = 200


@dataclass(frozen=True)
class FileStart:
    filename: str
    content_type: str


@dataclass(frozen=True)
class FileData:
    data: bytes


@dataclass(frozen=True)
class FileEnd:
    pass


@dataclass(frozen=True)
class Field:
    name: str
    value: str


Event = FileStart | FileData | FileEnd | Field


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type; 400 for anything else."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise BadUpload("Content-Type must be multipart/form-data")
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        raise BadUpload("multipart/form-data needs a boundary of 1 to 200 characters")
    return boundary


class StreamingForm:
    def __init__(self, boundary: bytes, *, field_limits: dict[str, int], default_field_limit: int = 4096,
                 max_parts: int = 32) -> None:
        self._field_limits = field_limits
        self._default_field_limit = default_field_limit
        self._max_parts = max_parts
        self._events: list[Event] = []
        self._parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name = ""
        self._is_file = False
        self._value = bytearray()
        self._limit = 0
        self.file_seen = False
        try:
            self._parser = MultipartParser(
                boundary,
                callbacks={
                    "on_part_begin": self._part_begin,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value_data,
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                },
                max_header_count=16,
                max_header_size=8192,
            )
        except (FormParserError, ValueError) as exc:
            raise BadUpload(f"bad multipart boundary: {exc}") from exc

    # -- parser callbacks (synchronous; they only record) -------------------------------------

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise BadUpload(f"too many form fields (at most {self._max_parts})")
        self._headers = {}
        self._name = ""
        self._is_file = False
        self._value = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).decode("latin-1").strip().lower()] = bytes(self._header_value).strip()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise BadUpload("every form part needs Content-Disposition: form-data with a name")
        # Browsers send the raw UTF-8 bytes of names; the parser hands them back as latin-1.
        self._name = options[b"name"].decode("utf-8", errors="replace")
        filename = options.get(b"filename")
        if self._name == FILE_FIELD:
            if filename is None:
                raise BadUpload("the `file` field must be sent as a file (with a filename)")
            if self.file_seen:
                raise BadUpload("only one file may be uploaded at a time")
            self.file_seen = True
            self._is_file = True
            content_type = self._headers.get("content-type", b"").decode("latin-1")
            self._events.append(FileStart(filename.decode("utf-8", errors="replace"), content_type))
            return
        if filename is not None:
            raise BadUpload(f"unexpected file in field `{self._name[:50]}`; send the file as `file`")
        self._limit = self._field_limits.get(self._name, self._default_field_limit)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            if end > start:
                self._events.append(FileData(bytes(data[start:end])))
            return
        self._value += data[start:end]
        if len(self._value) > self._limit:
            raise UploadTooLarge(f"form field `{self._name[:50]}` is too long (at most {self._limit} bytes)")

    def _part_end(self) -> None:
        if self._is_file:
            self._events.append(FileEnd())
            return
        try:
            value = bytes(self._value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadUpload(f"form field `{self._name[:50]}` is not valid UTF-8") from exc
        if "\x00" in value:
            raise BadUpload(f"form field `{self._name[:50]}` contains a NUL character")
        self._events.append(Field(self._name, value))

    # -- public ---------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[Event]:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise BadUpload(f"malformed multipart body: {exc}") from exc
        events, self._events = self._events, []
        return events

    @property
    def complete(self) -> bool:
        return self._parser.state == MultipartState.END

    def finish(self) -> None:
        if not self.complete:
            raise BadUpload("the multipart body ended before its closing boundary")
