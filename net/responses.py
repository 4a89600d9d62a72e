"""Responses the load balancer makes itself: a status line and a short plain-text body saying why."""
from __future__ import annotations

REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def lb_response(status: int, why: str, keep_alive: bool, version: int = 11, retry_after: float | None = None) -> bytes:
    """The whole response. `why` becomes the body: "<status> <reason>: <why>\\n"."""
    reason = REASONS.get(status, "Error")
    body = f"{status} {reason}: {why}\n".encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}", "Cache-Control: no-store"]
    if retry_after is not None:
        head.append(f"Retry-After: {max(1, int(-(-retry_after // 1)))}")
    if not keep_alive:
        head.append("Connection: close")
    elif version == 10:
        head.append("Connection: keep-alive")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
