"""The edge: a tiny HTTP/1.1 reverse proxy that owns a docker target's published port.

Why: a container's published port is fixed when it is created, so switching from the old container
to the new one on the same host port would otherwise mean stopping the old one first (requests fail
until the new one has loaded its model). The edge publishes the port once and forwards each request
to the backend named in its route file; a rollout tests the new backend beside the old one, rewrites
the route and sends SIGHUP. Requests are routed one by one (not connections), and a backend's
`Connection: close` is not passed on, so clients keep their keep-alive connections across the switch
and the old backend drains what it was doing before it is stopped.

Standard library only (runs on the bare base image). Request bodies are read whole (at most
`--max-body` bytes, 413 above, chunked ones de-chunked) and sent with a Content-Length; responses are
streamed back by Content-Length, chunked framing or until the backend closes.
Usage: python3 edge.py --port 8080 --route /app/run/route.json --max-body 1048576
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys

HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"proxy-authenticate", b"proxy-authorization", b"content-length"}
MAX_HEAD = 64 * 1024
IDLE_PER_BACKEND = 64


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Start line and (lower-cased name, value) pairs of a request or response head."""
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [v for n, v in headers if n == name]
    if len(values) > 1 and name == b"content-length" and len(set(values)) > 1:
        raise BadRequest(400, "conflicting Content-Length headers")
    return values[-1] if values else None


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return (await reader.readuntil(b"\r\n\r\n"))[:-4]
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest(400, "incomplete request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "request head too large") from None


async def read_chunked(reader: asyncio.StreamReader, limit: int | None) -> bytes:
    parts, size = [], 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            n = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise BadRequest(400, "malformed chunk size") from None
        if n == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers: dropped
                pass
            return b"".join(parts)
        size += n
        if limit is not None and size > limit:
            raise BadRequest(413, f"request body larger than {limit} bytes")
        parts.append(await reader.readexactly(n))
        await reader.readexactly(2)


def reply(status: int, message: str, close: bool) -> bytes:
    reason = {400: "Bad Request", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
              502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Error")
    code = {413: "REQUEST_TOO_LARGE", 502: "BAD_GATEWAY", 503: "SERVICE_UNAVAILABLE"}.get(status, "BAD_REQUEST")
    body = json.dumps({"error_code": code, "message": f"edge: {message}"}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: {'close' if close else 'keep-alive'}\r\n\r\n")
    return head.encode() + body


class Backend:
    """One upstream address and its idle keep-alive connections."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.address, self.host, self.port = address, host.strip("[]"), int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.retired = False

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer, False

    def release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reusable: bool) -> None:
        if reusable and not self.retired and len(self.idle) < IDLE_PER_BACKEND:
            self.idle.append((reader, writer))
        else:
            writer.close()

    def retire(self) -> None:
        """No new requests: close idle connections; busy ones close when their response is done."""
        self.retired = True
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class Edge:
    def __init__(self, route_file: str, max_body: int | None) -> None:
        self.route_file = route_file
        self.max_body = max_body
        self.backend: Backend | None = None
        self.reload()

    def reload(self) -> None:
        try:
            with open(self.route_file, encoding="utf-8") as fh:
                address = json.load(fh).get("backend")
        except (OSError, ValueError) as exc:
            print(f"edge: route file {self.route_file}: {exc}", file=sys.stderr, flush=True)
            return
        if self.backend is not None and self.backend.address == address:
            return
        old, self.backend = self.backend, (Backend(address) if address else None)
        if old is not None:
            old.retire()
        print(f"edge: routing to {address}", file=sys.stderr, flush=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    async def one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True when the client connection stays open."""
        try:
            head = await read_head(reader)
            if head is None:
                return False
            start, headers = parse_head(head)
            parts = start.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                raise BadRequest(400, "malformed request line")
            conn = (header(headers, b"connection") or b"").lower()
            keep = b"close" not in conn if parts[2] == b"HTTP/1.1" else b"keep-alive" in conn
            if b"chunked" in (header(headers, b"transfer-encoding") or b"").lower():
                body = await read_chunked(reader, self.max_body)
            else:
                length = header(headers, b"content-length")
                if length is not None and not length.isdigit():
                    raise BadRequest(400, "invalid Content-Length")
                n = int(length or 0)
                if self.max_body is not None and n > self.max_body:
                    raise BadRequest(413, f"request body larger than {self.max_body} bytes")
                body = await reader.readexactly(n) if n else b""
        except BadRequest as exc:
            writer.write(reply(exc.status, str(exc), close=True))
            await writer.drain()
            return False
        kept = [b"%s: %s" % (n, v) for n, v in headers if n not in HOP]
        request = b"\r\n".join([start, *kept, b"content-length: %d" % len(body), b"", b""]) + body
        return await self.forward(request, parts[0] == b"HEAD", keep, writer)

    async def forward(self, request: bytes, is_head: bool, keep: bool, writer: asyncio.StreamWriter) -> bool:
        for attempt in (0, 1):  # a pooled connection the backend closed meanwhile: retry once, fresh
            backend = self.backend
            if backend is None:
                writer.write(reply(503, "no backend is routed", close=not keep))
                await writer.drain()
                return keep
            try:
                up_reader, up_writer, reused = await backend.connect()
            except OSError as exc:
                writer.write(reply(502, f"backend {backend.address} unreachable ({exc.strerror or exc})", not keep))
                await writer.drain()
                return keep
            sent_any = False
            try:
                up_writer.write(request)
                await up_writer.drain()
                head = await read_head(up_reader)
                if head is None:
                    raise ConnectionResetError("backend closed the connection")
                status_line, headers = parse_head(head)
                status = int(status_line.split(b" ")[1])
                up_conn = (header(headers, b"connection") or b"").lower()
                reusable = b"close" not in up_conn
                kept = [b"%s: %s" % (n, v) for n, v in headers if n not in HOP]
                chunked = b"chunked" in (header(headers, b"transfer-encoding") or b"").lower()
                length = header(headers, b"content-length")
                no_body = is_head or status in (204, 304) or 100 <= status < 200
                framing = [b"content-length: " + length] if length is not None else []
                if chunked and not no_body:
                    framing = [b"transfer-encoding: chunked"]
                elif length is None and not no_body:
                    keep, reusable = False, False  # body ends when the backend closes: so must we
                out = b"\r\n".join([status_line, *kept, *framing,
                                    b"connection: " + (b"keep-alive" if keep else b"close"), b"", b""])
                writer.write(out)
                sent_any = True
                if no_body:
                    pass
                elif chunked:
                    while True:
                        line = await up_reader.readuntil(b"\r\n")
                        writer.write(line)
                        n = int(line.split(b";")[0].strip(), 16)
                        if n == 0:
                            while (trailer := await up_reader.readuntil(b"\r\n")) != b"\r\n":
                                writer.write(trailer)
                            writer.write(b"\r\n")
                            break
                        writer.write(await up_reader.readexactly(n + 2))
                elif length is not None:
                    remaining = int(length)
                    while remaining:
                        chunk = await up_reader.read(min(remaining, 1 << 16))
                        if not chunk:
                            raise ConnectionResetError("backend closed mid-response")
                        writer.write(chunk)
                        remaining -= len(chunk)
                else:
                    while chunk := await up_reader.read(1 << 16):
                        writer.write(chunk)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, BadRequest, ValueError, IndexError) as exc:
                up_writer.close()
                if sent_any:
                    return False  # the client saw part of a response: closing is all that is left
                if reused and attempt == 0:
                    continue
                writer.write(reply(502, f"backend {backend.address} failed ({exc})", close=not keep))
                await writer.drain()
                return keep
            backend.release(up_reader, up_writer, reusable)
            return keep
        return False


async def main_async(args: argparse.Namespace) -> None:
    edge = Edge(args.route, args.max_body)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, edge.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((args.host, args.port))
    server = await asyncio.start_server(edge.handle, sock=sock, limit=MAX_HEAD, backlog=2048)
    print(f"edge: listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge", description="Route a published port to the live backend.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--route", default="/app/run/route.json")
    parser.add_argument("--max-body", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        import uvloop  # not on the bare base image; used when present

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
