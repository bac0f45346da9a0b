"""A ClickHouse HTTP interface over chdb (ClickHouse 26.9 in-process), for the tests.

    python chdb_server.py --port PORT --path DATA_DIR [--user NAME] [--password PW]

chdb has no server, so this speaks the part of ClickHouse's HTTP interface
that rwgate (the `clickhouse` crate 0.15) and tests/common/clickhouse.rs use,
the way `src/Server/HTTPHandler.cpp` does, with the engine doing all SQL:

- `GET /` and `/ping` answer "Ok.\\n". Any other request is a query: the
  `query` parameter, a newline and the body (POST), like the server. GET runs
  only read-only statements (the server sets readonly=2 for GET).
- `database=` (or X-ClickHouse-Database), `default_format=` (or
  X-ClickHouse-Format; TabSeparated otherwise); every other parameter but the
  reserved ones is a setting, applied with SET (so an unknown one fails with
  the engine's own Code: 115) and undone after the request: each request
  starts from the same settings and database, as over HTTP without sessions
  (hence SET statements are refused: here they would outlive the request).
- Credentials: X-ClickHouse-User/-Key, HTTP Basic, or user=/password=, never
  two of them; one user (default: `default`, no password).
- `INSERT INTO t[(cols)] FORMAT F` / `VALUES` with the data after it: the
  data goes to the engine's parser for F untouched (`FROM INFILE` a file of
  it), so RowBinary stays byte-exact.
- Bodies: `decompress=1` (ClickHouse's native blocks: CityHash128 checksum,
  verified; LZ4 or none) and Content-Encoding gzip/deflate/xz/bz2/lz4.
  Answers: `compress=1` (native LZ4 blocks of 1 MiB) and, when
  enable_http_compression (1 on 26.9) and Accept-Encoding allow, LZ4 frames
  (the server's frame settings), gzip, deflate, xz or bz2, errors included.
- Errors: the status ClickHouse maps the code to
  (`exceptionCodeToHTTPStatus.cpp`), `X-ClickHouse-Exception-Code`, and the
  body `Code: N. DB::Exception: ... (NAME) (version V (official build))`.
- One statement per request (multi-statements fail with Code: 62, as on the
  server), one request at a time (one chdb session, behind a lock).

What it cannot do exactly fails loudly with Code: 48 (NOT_IMPLEMENTED, HTTP
501) instead of being accepted: sessions, roles, query parameters (`param_*`,
multipart bodies), `readonly`, progress headers, zstd/brotli/snappy, other
INSERT forms carrying data. Results are buffered whole, so an error never
follows a 200 (as with wait_end_of_query=1); temporary tables outlive the
request (chdb keeps one session).
"""

import argparse
import base64
import binascii
import bz2
import gzip
import lzma
import os
import re
import struct
import tempfile
import sys
import threading
import traceback
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import chdb.session
import lz4.block
import lz4.frame
from clickhouse_cityhash.cityhash import CityHash128

# Parameters the server reads itself; every other one is a setting.
RESERVED = {"query", "database", "default_format", "compress", "decompress", "user",
            "password", "quota_key", "query_id", "stacktrace", "buffer_size",
            "wait_end_of_query"}
# Parameters and settings whose effect this front does not reproduce.
UNSUPPORTED = {"session_id", "session_timeout", "session_check", "close_session", "role",
               "readonly", "send_progress_in_http_headers", "client_protocol_version",
               "http_write_exception_in_output_format"}
# exceptionCodeToHTTPStatus.cpp, by error name.
STATUS_BY_NAME = {
    401: "REQUIRED_PASSWORD",
    403: "UNKNOWN_USER WRONG_PASSWORD AUTHENTICATION_FAILED SET_NON_GRANTED_ROLE ACCESS_DENIED",
    400: "BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE "
         "CANNOT_PARSE_QUOTED_STRING CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER "
         "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 "
         "CANNOT_PARSE_INPUT_ASSERTION_FAILED CANNOT_PARSE_UUID DUPLICATE_COLUMN ILLEGAL_COLUMN "
         "UNKNOWN_ELEMENT_IN_AST UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST "
         "TOO_BIG_AST UNEXPECTED_AST_STRUCTURE SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH "
         "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    404: "UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE "
         "UNKNOWN_DATABASE UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION "
         "UNKNOWN_FORMAT UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE",
    413: "QUERY_IS_TOO_LARGE",
    501: "NOT_IMPLEMENTED",
    503: "SOCKET_TIMEOUT CANNOT_OPEN_FILE CANNOT_SCHEDULE_TASK",
    411: "HTTP_LENGTH_REQUIRED",
    408: "TIMEOUT_EXCEEDED",
    415: "UNSUPPORTED_MEDIA_TYPE",
}
# Content-Encoding name -> (decode, encode); ClickHouse also knows these three.
CODECS = {
    "gzip": (gzip.decompress, gzip.compress),
    "deflate": (zlib.decompress, zlib.compress),
    "xz": (lzma.decompress, lzma.compress),
    "bz2": (bz2.decompress, bz2.compress),
    # Lz4DeflatingWriteBuffer's preferences: 256 KiB linked blocks, no checksums, no size.
    "lz4": (lz4.frame.decompress, lambda b: lz4.frame.compress(
        b, block_size=lz4.frame.BLOCKSIZE_MAX256KB, block_linked=True,
        content_checksum=False, block_checksum=False, store_size=False)),
}
CANNOT = ("zstd", "br", "snappy")
# chooseHTTPCompressionMethod: the first of these found in Accept-Encoding.
ACCEPT_ORDER = ("zstd", "br", "lz4", "snappy", "gzip", "deflate", "xz", "bz2")
# INSERT ... FORMAT name / VALUES, as the crate and the tests send it.
IDENT = r"(?:`(?:[^`\\]|\\.)*`|\"[^\"]*\"|[A-Za-z_][\w$]*)"
INSERT = re.compile(
    rf"\s*INSERT\s+INTO\s+(?:TABLE\s+)?(?P<target>{IDENT}(?:\.{IDENT})?\s*(?:\([^()]*\))?)\s*"
    r"(?:(?P<values>VALUES)\s*|FORMAT\s+(?P<format>[A-Za-z_]\w*))", re.I | re.S)
READONLY_KINDS = {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "USE"}


class ChError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class Engine:
    """The chdb session and everything that needs the lock."""

    def __init__(self, path):
        self.lock = threading.Lock()
        self.sess = chdb.session.Session(path)
        self.tmp = path.rstrip("/") + ".insert"  # the data of one INSERT at a time
        os.makedirs(self.tmp, exist_ok=True)
        # chdb turns implicit_select on; a server has it off ("1+1" is an error).
        self.sess.query("SET implicit_select = 0")
        self.version = self.scalar("SELECT version()")
        self.codes = {}
        for line in self.scalar("SELECT arrayStringConcat(groupArray(concat(toString(number), "
                                "' ', errorCodeToName(number))), '\\n') FROM numbers(2000) "
                                "WHERE errorCodeToName(number) != ''").splitlines():
            code, name = line.split(" ")
            self.codes[name] = int(code)
        self.names = {c: n for n, c in self.codes.items()}
        self.baseline = self.changed_settings()

    def scalar(self, sql, **params):
        return self.sess.query(sql, "TabSeparatedRaw", params=params or None).bytes().decode().rstrip("\n")

    def changed_settings(self):
        rows = self.scalar("SELECT name, value FROM system.settings WHERE changed AND name != 'database'")
        return dict(line.split("\t", 1) for line in rows.splitlines() if line)

    def error(self, name, message):
        return ChError(self.codes[name], f"{message}. ({name})")

    def status(self, code):
        name = self.names.get(code, "")
        for status, names in STATUS_BY_NAME.items():
            if name in names.split():
                return status
        return 500

    def run(self, database, settings, text, fmt, readonly):
        """Runs one statement (`text`, bytes) and returns its output."""
        with self.lock:
            applied = []
            try:
                self.sess.query(f"USE {backquote(database)}")
                for k, v in settings:
                    self.sess.query(f"SET {k} = {quote(v)}")
                    applied.append(k)
                return self.execute(text, fmt, readonly)
            except (chdb.ChdbError, RuntimeError) as e:
                raise self.from_engine(str(e)) from None
            finally:
                # Back to the settings every request starts from (a failure
                # here would leak them into the next request: stop instead).
                try:
                    for k in applied:
                        v = self.baseline.get(k)
                        self.sess.query(f"SET {k} = " + ("DEFAULT" if v is None else quote(v)))
                except Exception as e:  # noqa: BLE001
                    print(f"chdb front: cannot reset settings {applied}: {e}", file=sys.stderr, flush=True)
                    os._exit(1)

    def execute(self, text, fmt, readonly):
        head = text[:1 << 16].decode("latin-1")
        m = INSERT.match(head)
        if m:
            if readonly:
                raise self.error("READONLY", "default: Cannot execute query in readonly mode")
            data = text[m.end():]
            fmt_in = "Values"
            if m["format"]:
                fmt_in = m["format"]
                data = data.lstrip(b" \t\f")
                if data.startswith(b";"):
                    raise self.error("SYNTAX_ERROR", "You have excessive ';' symbol before data for INSERT")
                data = data[1:] if data.startswith(b"\r") else data
                data = data[1:] if data.startswith(b"\n") else data
            # FROM INFILE, not chdb's streaming insert: that one reports
            # success when the table refuses the block (a MATERIALIZED throwIf).
            fd, path = tempfile.mkstemp(dir=self.tmp)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                self.sess.query(f"INSERT INTO {m['target'].encode('latin-1').decode()} "
                                f"FROM INFILE {quote(path)} FORMAT {fmt_in}")
            finally:
                os.unlink(path)
            return b""
        try:
            sql = text.decode()
        except UnicodeDecodeError:
            raise self.error("NOT_IMPLEMENTED", "chdb front: the query text is not UTF-8") from None
        # The engine's parser, on the text alone: one statement, and of what kind.
        tsv = sql.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        try:
            kind = self.scalar("SELECT formatQuerySingleLine({q:String})", q=tsv)
        except chdb.ChdbError as e:
            raise self.from_engine(str(e).split(": In scope SELECT formatQuerySingleLine(")[0]) from None
        if kind.startswith("SET "):
            raise self.error("NOT_IMPLEMENTED", "chdb front: SET (it would outlive the request here)")
        if kind.startswith("INSERT") and " FORMAT " in kind:
            raise self.error("NOT_IMPLEMENTED", "chdb front: only INSERT INTO t[(cols)] FORMAT f / VALUES carry data here")
        if readonly and kind.split(" ", 1)[0].upper() not in READONLY_KINDS and not kind.startswith("("):
            raise self.error("READONLY", "default: Cannot execute query in readonly mode")
        return self.sess.query(sql, fmt).bytes()

    def from_engine(self, msg):
        """chdb's message, in the server's shape (chdb nests and prefixes it)."""
        msg = re.sub(r" \(in file/uri [^)]*\)|: While executing File|: data for INSERT was parsed from file", "", msg)
        m = re.match(r"Code: (\d+)\. ", msg)
        if not m:
            return self.error("NOT_IMPLEMENTED", f"chdb front: unexpected engine error: {msg}")
        code = int(m[1])
        while (m := re.match(r"Code: \d+\. DB::Exception: ", msg)):
            msg = msg[m.end():]
        msg = re.sub(r" \(version [^()]*\)", "", msg)
        name = self.names.get(code, "")
        msg = re.sub(rf"(?:\.? \({name}\))+", "", msg) if name else msg
        return ChError(code, f"{msg.rstrip('. ')}. ({name})" if name else msg)


def quote(s):
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def backquote(s):
    return "`" + s.replace("\\", "\\\\").replace("`", "\\`") + "`"


def native_blocks(data, engine):
    """Decodes a `decompress=1` body: [checksum 16][method 1][size 4][raw size 4][data]."""
    out, pos, check = [], 0, True
    while pos < len(data):
        if len(data) - pos < 25:
            raise engine.error("CANNOT_READ_ALL_DATA", "Cannot read all data of a compressed block header")
        method, size, raw_size = struct.unpack_from("<BII", data, pos + 16)
        block = data[pos + 16:pos + 16 + size]
        if size < 9 or len(block) < size:
            raise engine.error("CANNOT_READ_ALL_DATA", f"Cannot read all data. Bytes expected: {size}")
        hi, lo = struct.unpack_from("<QQ", data, pos)
        actual = CityHash128(block)
        if check and (hi, lo) != (actual >> 64, actual & (2 ** 64 - 1)):
            raise engine.error("CHECKSUM_DOESNT_MATCH", "Checksum doesn't match: corrupted data. "
                               f"Reference: {hi:016x}{lo:016x}. Actual: {actual >> 64:016x}"
                               f"{actual & (2 ** 64 - 1):016x}. Size of compressed block: {size}")
        if method == 0x82:
            try:
                out.append(lz4.block.decompress(block[9:], uncompressed_size=raw_size))
            except lz4.block.LZ4BlockError:
                raise engine.error("CANNOT_DECOMPRESS", "Cannot decompress LZ4-encoded data") from None
        elif method == 0x02:
            out.append(block[9:])
        elif method in (0x90, 0x91, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97):
            raise engine.error("NOT_IMPLEMENTED", f"chdb front: compression method 0x{method:02x} in a decompress=1 body")
        else:
            raise engine.error("UNKNOWN_COMPRESSION_METHOD", f"Unknown compression method: {method}")
        if len(out[-1]) != raw_size:
            raise engine.error("CANNOT_DECOMPRESS", "Cannot decompress: wrong decompressed size")
        pos += 16 + size
    return b"".join(out)


def compress_native(data):
    """`compress=1`: CompressedWriteBuffer's LZ4 blocks of at most 1 MiB."""
    out = []
    for i in range(0, len(data), 1 << 20):
        raw = data[i:i + (1 << 20)]
        comp = lz4.block.compress(raw, store_size=False)
        block = struct.pack("<BII", 0x82, 9 + len(comp), len(raw)) + comp
        h = CityHash128(block)
        out.append(struct.pack("<QQ", h >> 64, h & (2 ** 64 - 1)) + block)
    return b"".join(out)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 300  # idle keep-alive connections
    engine: Engine
    user: str
    password: str

    def do_GET(self):
        if self.path in ("/", "/ping"):
            return self.reply(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
        self.query(readonly=True)

    def do_POST(self):
        self.query(readonly=False)

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except Exception as e:  # noqa: BLE001 -- a bug here: say so, loudly
            traceback.print_exc()
            self.close_connection = True
            try:
                self.fail(ChError(1001, f"chdb front: internal error: {e!r}. (STD_EXCEPTION)"))
            except OSError:
                pass

    def reply(self, status, body, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def fail(self, e, encode=lambda b: (b, {})):
        body, headers = encode(f"Code: {e.code}. DB::Exception: {e.message} (version "
                               f"{self.engine.version} (official build))\n".encode())
        headers = {"Content-Type": "text/plain; charset=UTF-8",
                   "X-ClickHouse-Exception-Code": str(e.code), **headers}
        self.reply(self.engine.status(e.code), body, headers)

    def body(self):
        """The request body, or None if the client did not send it whole."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError:
                    return None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                chunk = self.rfile.read(size)
                if len(chunk) < size or self.rfile.read(2) != b"\r\n":
                    return None
                parts.append(chunk)
        length = self.headers.get("Content-Length")
        if length is None:
            return b"" if self.command == "GET" else False
        data = self.rfile.read(int(length))
        return data if len(data) == int(length) else None

    def query(self, readonly):
        engine = self.engine
        body = self.body()
        if body is None:  # cut off: the server would not run it either
            self.close_connection = True
            return
        try:
            if body is False:
                raise engine.error("HTTP_LENGTH_REQUIRED", "The Transfer-Encoding is not chunked and there is no Content-Length header for POST request")
            params = parse_qsl(urlsplit(self.path).query, keep_blank_values=True)
            self.authenticate(dict(params))
        except ChError as e:
            return self.fail(e)
        encode = lambda b: (b, {})  # noqa: E731
        try:
            p = dict(params)
            accept = self.headers.get("Accept-Encoding", "")
            method = next((m for m in ACCEPT_ORDER if m in accept), None)
            http_compression = p.get("enable_http_compression", engine.baseline.get(
                "enable_http_compression", "1")).lower() in ("1", "true")
            if method and not http_compression:
                method = None
            if method in CANNOT:
                raise engine.error("NOT_IMPLEMENTED", f"chdb front: Accept-Encoding {method}")
            native = p.get("compress", "0") not in ("0", "false", "")

            def encode(b):
                b = compress_native(b) if native else b
                return (CODECS[method][1](b), {"Content-Encoding": method}) if method else (b, {})

            settings = []
            for k, v in params:
                if k in UNSUPPORTED or k.startswith("param_"):
                    raise engine.error("NOT_IMPLEMENTED", f"chdb front: parameter {k}")
                if k and k not in RESERVED:
                    settings.append((k, v))
            if self.headers.get_content_type() == "multipart/form-data":
                raise engine.error("NOT_IMPLEMENTED", "chdb front: multipart bodies (external data, query parameters)")
            coding = self.headers.get("Content-Encoding", "").strip().lower()
            if coding in CANNOT:
                raise engine.error("NOT_IMPLEMENTED", f"chdb front: Content-Encoding {coding}")
            if coding not in ("", "none", "identity"):
                if coding not in CODECS:
                    raise engine.error("BAD_ARGUMENTS", f"Unknown compression method '{coding}'")
                body = CODECS[coding][0](body)
            if p.get("decompress", "0") not in ("0", "false", ""):
                body = native_blocks(body, engine)
            text = p.get("query", "")
            text = (text.encode() + b"\n" if text else b"") + body
            if not text.strip():
                raise engine.error("SYNTAX_ERROR", "Empty query")
            database = self.headers.get("X-ClickHouse-Database") or p.get("database") or "default"
            fmt = self.headers.get("X-ClickHouse-Format") or p.get("default_format") or "TabSeparated"
            out = engine.run(database, settings, text, fmt, readonly)
        except ChError as e:
            return self.fail(e, encode)
        data, headers = encode(out)
        headers["Content-Type"] = "text/plain; charset=UTF-8"
        headers["X-ClickHouse-Query-Id"] = p.get("query_id") or str(uuid.uuid4())
        self.reply(200, data, headers)

    def authenticate(self, p):
        """authenticateUserByHTTP: one way of passing credentials, then one check."""
        h_user = self.headers.get("X-ClickHouse-User", "")
        h_key = self.headers.get("X-ClickHouse-Key", "")
        auth = self.headers.get("Authorization")
        in_params = any(k in p for k in ("user", "password", "quota_key"))
        fail = lambda m: self.engine.error("AUTHENTICATION_FAILED", m)  # noqa: E731
        if h_user or h_key:
            if auth is not None or in_params:
                raise fail("Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers and other authentication methods simultaneously")
            user, password = h_user or "default", h_key
        elif auth is not None:
            if in_params:
                raise fail("Invalid authentication: it is not allowed to use Authorization HTTP header and authentication via parameters simultaneously")
            scheme, _, info = auth.partition(" ")
            if scheme.lower() != "basic":
                raise fail(f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported")
            try:
                user, _, password = base64.b64decode(info, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise fail("Invalid authentication: malformed Basic credentials") from None
        else:
            user, password = p.get("user", "default"), p.get("password", "")
        if (user, password) != (self.user, self.password):
            raise fail(f"{user}: Authentication failed: password is incorrect, or there is no user with such name")

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        sys.stderr.write("%s %s\n" % (self.log_date_time_string(), format % args))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True, help="the data directory (kept across restarts)")
    ap.add_argument("--user", default="default")
    ap.add_argument("--password", default="")
    args = ap.parse_args()
    Handler.engine = Engine(args.path)
    Handler.user, Handler.password = args.user, args.password
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"chdb {Handler.engine.version} on 127.0.0.1:{args.port}, data in {args.path}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
