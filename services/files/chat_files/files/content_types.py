"""What a file is, judged by its first bytes (magic numbers), and whether its name agrees.

The extension alone proves nothing: a client can call an executable ``cat.png``. A file is
accepted only when its extension is allowed *and* its first bytes are that kind of file.
"""
from __future__ import annotations

import codecs
import re
import unicodedata

from chat_common.errors import UnsupportedMediaTypeError
from chat_common.names import TYPE_HEAD_BYTES

# Enough for every signature below and for a fair look at whether a file is text.
HEAD_BYTES = TYPE_HEAD_BYTES
MAX_ORIGINAL_NAME_CHARS = 255

# extension -> (kind, content type served)
_EXTENSIONS: dict[str, tuple[str, str]] = {
    "jpg": ("jpeg", "image/jpeg"),
    "jpeg": ("jpeg", "image/jpeg"),
    "png": ("png", "image/png"),
    "gif": ("gif", "image/gif"),
    "webp": ("webp", "image/webp"),
    "pdf": ("pdf", "application/pdf"),
    "txt": ("text", "text/plain; charset=utf-8"),
}
SUPPORTED_EXTENSIONS = frozenset(_EXTENSIONS)

_KIND_NAMES = {
    "jpeg": "a JPEG image",
    "png": "a PNG image",
    "gif": "a GIF image",
    "webp": "a WebP image",
    "pdf": "a PDF document",
    "text": "plain text",
    "executable": "an executable program",
}

_EXECUTABLE_MAGIC = (
    b"\x7fELF",  # Linux/Unix ELF
    b"MZ",  # Windows PE / DOS
    b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe",  # Mach-O
    b"\xca\xfe\xba\xbe",  # Mach-O universal / Java class
    b"\x00asm",  # WebAssembly
)


def _is_text(head: bytes, complete: bool) -> bool:
    if b"\x00" in head:
        return False
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        # A head cut inside a multi-byte character is still text; only the whole file must end
        # on a character boundary.
        decoder.decode(head, final=complete)
    except UnicodeDecodeError:
        return False
    return True


def detect_kind(head: bytes, complete: bool) -> str | None:
    """The kind of file ``head`` starts; ``complete`` means head is the whole file."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    # PDF readers accept the header anywhere in the first KiB.
    if b"%PDF-" in head[:1024]:
        return "pdf"
    # Text before executables: "MZ is ..." is text; a real PE or ELF header holds NUL bytes.
    if _is_text(head, complete):
        return "text"
    if head.startswith(_EXECUTABLE_MAGIC):
        return "executable"
    return None


def extension_of(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem else ""


def check_extension(name: str, allowed: tuple[str, ...]) -> str:
    """The lower-cased extension of ``name`` if it is an allowed one; else 415."""
    ext = extension_of(name)
    allowed_text = ", ".join(f".{t}" for t in allowed)
    if not ext:
        raise UnsupportedMediaTypeError(f"the file name has no extension; allowed types: {allowed_text}")
    if ext not in allowed or ext not in _EXTENSIONS:
        raise UnsupportedMediaTypeError(f"files of type .{ext} are not accepted; allowed types: {allowed_text}")
    return ext


def check_content(ext: str, head: bytes, complete: bool) -> str:
    """The content type to store for a file named ``*.ext`` whose first bytes are ``head``;
    415 when the bytes are not that kind of file."""
    expected, content_type = _EXTENSIONS[ext]
    kind = detect_kind(head, complete)
    if kind == expected:
        return content_type
    if kind is None:
        what = "not a file of a known type" if expected != "text" else "not UTF-8 text"
        raise UnsupportedMediaTypeError(f"the content of this .{ext} file is {what}")
    raise UnsupportedMediaTypeError(
        f"the content of this .{ext} file is {_KIND_NAMES[kind]}, not {_KIND_NAMES[expected]}"
    )


_UNSAFE_CHARS = re.compile(r'[<>:"|?*]')
_SPACES = re.compile(r"\s+")


def sanitize_original_name(raw: str) -> str:
    """A file name safe to keep and to show back: no directories, no control or invisible
    formatting characters, bounded length, extension kept."""
    name = unicodedata.normalize("NFC", raw)
    # Both separators: a Windows client may send C:\\Users\\x\\a.txt, an attacker ../../a.txt.
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    kept = []
    for ch in name:
        category = unicodedata.category(ch)
        if category[0] == "C":  # control, format (RTL override), surrogate, private, unassigned
            continue
        kept.append(" " if category[0] == "Z" else ch)
    name = _UNSAFE_CHARS.sub("_", "".join(kept))
    # Leading dots make hidden files and are what is left of "..".
    name = _SPACES.sub(" ", name).strip(" .")
    if len(name) > MAX_ORIGINAL_NAME_CHARS:
        ext = extension_of(name)
        if ext and len(ext) < 16:
            name = name[: MAX_ORIGINAL_NAME_CHARS - len(ext) - 1].rstrip(" .") + "." + ext
        else:
            name = name[:MAX_ORIGINAL_NAME_CHARS].rstrip(" .")
    return name or "file"
