"""segapp.uploads: the image of a multipart form is found without parsing every field, and odd forms are 400s."""

from __future__ import annotations

import pytest
from webob import Request
from webob.exc import HTTPBadRequest

from segapp.uploads import MAX_FORM_PARTS, form_image, read_image

BOUNDARY = "xYzBoundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, str | None, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body of (name, filename or None for a text field, content) parts."""
    lines = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        lines.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(lines) + f"--{boundary}--\r\n".encode()


def refused(content_type: str, body: bytes) -> str:
    """The error code of the 400 that `form_image` raises."""
    with pytest.raises(HTTPBadRequest) as caught:
        form_image(content_type, body)
    return caught.value.api_code


def test_file_field_image_is_returned_byte_for_byte():
    image = b"\xff\xd8\r\n\r\n--not-the-boundary\r\n\x00\xff\xd9"
    body = form(("note", None, b"a cat"), ("image", "cat.jpg", image), ("after", None, b"x"))
    assert form_image(CONTENT_TYPE, body) == image


def test_quoted_boundary_and_preamble_are_understood():
    body = b"a preamble\r\n" + form(("image", "a.png", b"PNGDATA"), boundary="b c") + b"an epilogue"
    assert form_image('multipart/form-data; boundary="b c"', body) == b"PNGDATA"


def test_read_image_takes_the_form_of_a_request():
    body = form(("image", "a.jpg", b"JPEGDATA"))
    request = Request.blank("/infer", method="POST", body=body, content_type=CONTENT_TYPE)
    assert read_image(request, 1_000_000) == b"JPEGDATA"


def test_a_second_image_field_is_refused_not_silently_taken():
    body = form(("image", "first.jpg", b"FIRST"), ("image", "second.jpg", b"SECOND"))
    assert refused(CONTENT_TYPE, body) == "duplicate_image_field"


def test_text_field_then_file_field_named_image_is_a_duplicate():
    assert refused(CONTENT_TYPE, form(("image", None, b"text"), ("image", "a.jpg", b"DATA"))) == "duplicate_image_field"


def test_form_with_too_many_parts_is_refused_before_its_parts_are_read():
    parts = [(f"f{index}", None, b"") for index in range(MAX_FORM_PARTS)] + [("image", "a.jpg", b"DATA")]
    assert refused(CONTENT_TYPE, form(*parts)) == "too_many_form_parts"
    # A body of 140,000 empty fields (9 MB) is refused by counting, whatever its parts hold.
    many = form(*[("f", None, b"")] * 140_000)
    assert refused(CONTENT_TYPE, many) == "too_many_form_parts"


def test_form_at_the_part_limit_is_read():
    parts = [(f"f{index}", None, b"") for index in range(MAX_FORM_PARTS - 1)] + [("image", "a.jpg", b"DATA")]
    assert form_image(CONTENT_TYPE, form(*parts)) == b"DATA"


@pytest.mark.parametrize("content_type, body, code", [
    ("multipart/form-data", form(("image", "a.jpg", b"x")), "bad_multipart"),
    ("multipart/form-data; boundary=", form(("image", "a.jpg", b"x")), "bad_multipart"),
    (f"multipart/form-data; boundary={'b' * 71}", form(("image", "a.jpg", b"x"), boundary="b" * 71), "bad_multipart"),
    (CONTENT_TYPE, form(("image", "a.jpg", b"x"))[:-16], "bad_multipart"),  # no closing boundary
    (CONTENT_TYPE, f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n--{BOUNDARY}--".encode(),
     "bad_multipart"),  # no blank line after the part's headers
    (CONTENT_TYPE, form(("picture", "a.jpg", b"x")), "missing_image_field"),
    (CONTENT_TYPE, form(("image", None, b"x")), "missing_image_field"),
    (CONTENT_TYPE, b"", "bad_multipart"),
], ids=["no-boundary", "empty-boundary", "boundary-too-long", "unclosed", "headers-unended", "other-field",
        "text-field", "empty-body"])
def test_malformed_forms_are_400_with_a_reason(content_type, body, code):
    assert refused(content_type, body) == code
