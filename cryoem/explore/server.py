"""The HTTP side of ``cryoem explore``: a threaded ``http.server`` over a :class:`~cryoem.explore.session.Session`.

Routes (all GET unless marked):

    /                         the page (``static/index.html``)
    /static/NAME              a file bundled in ``cryoem/explore/static`` (nothing else)
    /run/REL                  a file inside the run folder (``..`` and links out of it are refused)
    /api/meta                 JSON: particles, zdim, atoms, axes, columns, clusters, selections, paths
    /api/embedding?axes=A     (N, 2) float32, little-endian, row-major
    /api/column?name=C        (N,) float32; the header ``X-Column`` says how to draw it (JSON)
    /api/model?particle=I | cluster=C | z=a,b,..   PDB text, B-factor = displacement from the start (Å)
    /api/map?...              the same latents -> MRC density map
    POST /api/mean            body: uint32 particle indices -> PDB of the selection's mean model
    POST /api/path            JSON {"points": [[z..], ..] | "particles": [i, ..] | "pc": k, "frames": F, "name"}
    /api/selections           JSON list of saved selections
    POST /api/selections?name=NAME   body: uint32 particle indices -> writes the subset; 201 and its record
    /api/selections/NAME      uint32 particle indices of a saved selection

Security: the server binds 127.0.0.1 unless told otherwise, answers only requests whose ``Host`` is that
address (or ``localhost``; DNS rebinding), accepts a POST only from its own page (``Origin``; CSRF), reads no
path outside its two folders, and answers a malformed request with a 4xx and one line of JSON
(``{"error": ...}``), never a traceback.
"""

from __future__ import annotations

import json
import mimetypes
import os
import sys
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from cryoem.explore.session import Session
from plato_core.runinfo import UserError, one_line

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 << 20  # bytes: 16 M particle indices
LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    """One request. ``self.server.session`` is the run; ``self.server.allowed_hosts`` the accepted Host names."""

    server_version = "PlatoExplore/1"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------------- dispatch
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_HEAD(self) -> None:  # noqa: N802
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, json_bytes({"error": "HEAD is not supported"}), "application/json")

    def _handle(self, method: str) -> None:
        try:
            self._check_host()
            if method == "POST":
                self._check_origin()
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
            status, body, ctype, headers = route(self, method, urllib.parse.unquote(url.path), query)
        except ApiError as e:
            status, body, ctype, headers = e.status, json_bytes({"error": str(e)}), "application/json", {}
        except UserError as e:
            status, body, ctype, headers = 400, json_bytes({"error": str(e)}), "application/json", {}
        except Exception as e:  # noqa: BLE001 (a bug must not leak a traceback to the page; one line to the log)
            print(f"explore: internal error on {method} {self.path[:200]}: {type(e).__name__}: {one_line(e)}",
                  file=sys.stderr)
            status, body, ctype, headers = 500, json_bytes({"error": f"internal error: {one_line(e)}"}), \
                "application/json", {}
        self._reply(status, body, ctype, headers)

    def _check_host(self) -> None:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.server.allowed_hosts is not None and name not in self.server.allowed_hosts:
            raise ApiError(403, f"Host {host!r} refused: open the page as http://127.0.0.1:PORT/ (DNS rebinding)")

    def _check_origin(self) -> None:
        """A POST from another site's page (CSRF: it may not write into the run folder) is refused."""
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != \
                (self.headers.get("Host") or "").strip().lower():
            raise ApiError(403, f"Origin {origin!r} refused: only the explorer's own page may save")

    def _reply(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, an unknown method) as one JSON line;
        an unknown method is 405, not 501."""
        code = HTTPStatus.METHOD_NOT_ALLOWED if code == HTTPStatus.NOT_IMPLEMENTED else code
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        self._reply(code, json_bytes({"error": message or HTTPStatus(code).phrase}), "application/json",
                    {"Connection": "close"})

    def body(self) -> bytes:
        """The request body (``Content-Length`` bytes, at most ``MAX_BODY``)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a POST needs a Content-Length")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY >> 20} MiB")
        return self.rfile.read(int(length))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if self.server.verbose:
            super().log_message(format, *args)


# ----------------------------------------------------------------------------- routes
def route(h: Handler, method: str, path: str, q: dict) -> tuple[int, bytes, str, dict]:
    """(status, body, content type, extra headers) of one request; raises ApiError / UserError to refuse."""
    s: Session = h.server.session
    if ".." in path.split("/") or "\\" in path or "\x00" in path:
        raise ApiError(403, "paths with '..' are refused")
    if method == "GET":
        if path in ("/", "/index.html"):
            return 200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8", {}
        if path.startswith("/static/"):
            return serve_file(STATIC, path[len("/static/"):])
        if path.startswith("/run/"):
            return serve_file(s.run, path[len("/run/"):])
        if path in GET_API:
            return GET_API[path](s, q)
        if path.startswith("/api/selections/"):
            idx = s.selection_indices(path[len("/api/selections/"):])
            return 200, idx.astype("<u4").tobytes(), "application/octet-stream", {}
    elif method == "POST" and path in POST_API:
        return POST_API[path](s, q, h.body())
    elif method == "POST" and path in GET_API:
        raise ApiError(405, f"{path}: use GET")
    raise ApiError(404, f"{path}: no such page or API")


def serve_file(root: Path, rel: str) -> tuple[int, bytes, str, dict]:
    """A regular file at ``root/rel`` that resolves inside ``root`` (no links out of it), else 403 / 404."""
    root = root.resolve()
    target = (root / rel).resolve()
    if not rel or os.path.commonpath([root, target]) != str(root):
        raise ApiError(403, f"{rel}: outside the served folder")
    if any(part.startswith(".") for part in Path(rel).parts) or not target.is_file():
        raise ApiError(404, f"{rel}: not found")
    ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix in (".pdb", ".cxc", ".star", ".log", ".csv"):
        ctype = "text/plain; charset=utf-8"
    return 200, target.read_bytes(), ctype, {}


def api_meta(s: Session, q: dict):
    return 200, json_bytes(s.meta()), "application/json", {}


def api_embedding(s: Session, q: dict):
    xy = s.embedding(q.get("axes", "pca:1,2"))
    return 200, xy.astype("<f4").tobytes(), "application/octet-stream", {}


def api_column(s: Session, q: dict):
    if "name" not in q:
        raise ApiError(400, "column: give ?name=")
    values, info = s.column(q["name"])
    return 200, values.astype("<f4").tobytes(), "application/octet-stream", {"X-Column": json.dumps(info)}


def latent_from_query(s: Session, q: dict) -> np.ndarray:
    """The latent named by ``?particle=I``, ``?cluster=C`` or ``?z=a,b,...``."""
    try:
        if "particle" in q:
            return s.latent(particle=int(q["particle"]))
        if "cluster" in q:
            return s.latent(cluster=int(q["cluster"]))
        if "z" in q:
            return s.latent(z=[float(v) for v in q["z"].split(",")])
    except ValueError:
        raise ApiError(400, "particle / cluster: expected an integer; z: comma-separated numbers") from None
    raise ApiError(400, "give ?particle=I, ?cluster=C or ?z=a,b,...")


def api_model(s: Session, q: dict):
    return 200, s.model_pdb(latent_from_query(s, q)), "text/plain; charset=utf-8", {}


def api_map(s: Session, q: dict):
    return 200, s.map_mrc(latent_from_query(s, q)), "application/octet-stream", {}


def api_selections(s: Session, q: dict):
    return 200, json_bytes(s.selections()), "application/json", {}


def read_indices(body: bytes) -> np.ndarray:
    """A body of little-endian uint32 particle indices -> (K,) int64."""
    if not body or len(body) % 4:
        raise ApiError(400, "body: expected little-endian uint32 particle indices (4 bytes each)")
    return np.frombuffer(body, dtype="<u4").astype(np.int64)


def post_mean(s: Session, q: dict, body: bytes):
    return 200, s.mean_pdb(read_indices(body)), "text/plain; charset=utf-8", {}


def post_selection(s: Session, q: dict, body: bytes):
    if "name" not in q:
        raise ApiError(400, "selection: give ?name=")
    if any(x["name"] == q["name"] for x in s.selections()):
        raise ApiError(409, f"selection {q['name']!r}: exists; choose another name")
    return 201, json_bytes(s.save_selection(q["name"], read_indices(body))), "application/json", {}


def post_path(s: Session, q: dict, body: bytes):
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "path: expected a JSON object") from None
    if not isinstance(req, dict):
        raise ApiError(400, "path: expected a JSON object")
    frames = req.get("frames", 20)
    if not isinstance(frames, int):
        raise ApiError(400, "frames: expected an integer")
    if "pc" in req:
        if not isinstance(req["pc"], int):
            raise ApiError(400, "pc: expected an integer")
        z = s.path_latents(pc=req["pc"], frames=frames)
    elif "particles" in req:
        parts = req["particles"]
        if not isinstance(parts, list) or not all(isinstance(i, int) for i in parts):
            raise ApiError(400, "particles: expected a list of particle numbers")
        z = s.path_latents([s.latent(particle=i) for i in parts], frames=frames)
    else:
        z = s.path_latents(_numbers(req.get("points")), frames=frames)
    return 201, json_bytes(s.write_path(z, req.get("name"))), "application/json", {}


def _numbers(points) -> list:
    if not isinstance(points, list) or not all(isinstance(p, list) and all(isinstance(v, (int, float)) for v in p)
                                               for p in points):
        raise ApiError(400, "points: expected a list of latents (lists of numbers)")
    return points


GET_API = {"/api/meta": api_meta, "/api/embedding": api_embedding, "/api/column": api_column,
           "/api/model": api_model, "/api/map": api_map, "/api/selections": api_selections}
POST_API = {"/api/mean": post_mean, "/api/selections": post_selection, "/api/path": post_path}


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()


# ----------------------------------------------------------------------------- the server
class ExploreServer(ThreadingHTTPServer):
    """A threaded HTTP server holding one session."""

    daemon_threads = True

    def __init__(self, session: Session, host: str, port: int, verbose: bool = False):
        self.session, self.verbose = session, verbose
        self.allowed_hosts = LOCAL_NAMES | {host.lower(), f"[{host.lower()}]"}
        if host in ("0.0.0.0", "::"):  # the user asked for every interface: any Host name the machine answers to
            self.allowed_hosts = None
        super().__init__((host, port), Handler)


def make_server(session: Session, host: str = "127.0.0.1", port: int = 8050, verbose: bool = False) -> ExploreServer:
    """Bind (``port`` 0: a free one); one UserError line when the address is taken or invalid."""
    try:
        return ExploreServer(session, host, port, verbose)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({one_line(e)}); try another --port") \
            from None


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8050, **session_args) -> None:
    """Open ``run`` and serve it until interrupted; prints the URL (and the SSH line for a remote machine)."""
    session = Session(run, **session_args)
    server = make_server(session, host, port)
    port = server.server_address[1]
    print(f"cryoem explore: {len(session.z):,} particles of {session.run}")
    print(f"open http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/")
    print(f"(on a remote machine, forward the port first: ssh -L {port}:127.0.0.1:{port} user@host)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
