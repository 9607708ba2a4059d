"""Reading request bodies within limits: a JSON object of bounded size, an upload counted as it arrives."""

from __future__ import annotations

from fastapi import Request

from helios.serve.limits import Limits, RequestError, human_bytes, parse_json_object

FORM_SLACK = 64 << 10  # room for the text fields of a multipart request beside the file


class LimitedReceive:
    """Counts request body bytes as they arrive and refuses beyond the limit (chunked uploads have no
    Content-Length to check up front)."""

    def __init__(self, receive, limit: int):
        self.receive, self.limit, self.total = receive, limit, 0

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request":
            self.total += len(message.get("body", b""))
            if self.total > self.limit:
                raise RequestError(f"the request is larger than the upload limit "
                                   f"({human_bytes(self.limit - FORM_SLACK)})", status=413)
        return message


def check_length(request: Request, limits: Limits) -> None:
    """Refuse a body whose Content-Length is past the upload limit, before reading any of it."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_upload_bytes + FORM_SLACK:
        raise RequestError(f"the request is {human_bytes(int(length))}; uploads may be at most "
                           f"{human_bytes(limits.max_upload_bytes)}", status=413)


async def json_body(request: Request, limit: int) -> dict:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", status=413)
    return parse_json_object(bytes(body))
