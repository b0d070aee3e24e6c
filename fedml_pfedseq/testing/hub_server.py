"""A Hugging Face Hub-compatible HTTP endpoint on this machine (standard library ``http.server``), for rehearsing a
push offline and for the tests: point ``HF_ENDPOINT`` at it and the real ``huggingface_hub`` client, PEFT and
transformers create repos, commit, and download through it.

It implements the routes those clients use: ``POST /api/repos/create`` and ``/api/repos/delete``, ``preupload``
(every file "regular", i.e. sent inline) and ``commit`` (NDJSON, files as base64), repo info (``/api/models/{id}``
and ``/revision/{rev}``), ``tree``, ``paths-info``, ``refs``, ``commits``, ``resolve`` (GET and HEAD, with the
X-Repo-Commit and ETag headers the download cache keys on), ``POST /api/validate-yaml`` and ``whoami-v2``.
LFS and Xet uploads, pull requests and branches other than ``main`` are refused with a message.

Commits are atomic: the whole request body is read and every operation checked before anything is stored; file
contents go to a content-addressed blob store, the commit record is written next, and only then does the branch
move to it (one ``os.replace``). A request that breaks off or fails midway leaves the branch on the previous
commit, whose files are untouched, so a partial upload can never make the repo serve a mix of old and new weights.

Run ``pfedseq hub-serve --root DIR`` (or ``python -m fedml_pfedseq.testing.hub_server``) and export the
``HF_ENDPOINT`` it prints, plus any ``HF_TOKEN``. Started with ``--token T``, it refuses every request (reads and
writes alike, as for a private repo) that does not carry ``Authorization: Bearer T`` with 401, so a rehearsal also
rehearses authentication.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")
BRANCH = "main"


class HubError(Exception):
    """An answer other than 200: the status, the Hub's X-Error-Code (if any) and a message for the client."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_repo_path(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts) \
            or path != "/".join(parts):
        raise HubError(400, f"invalid file path {path!r}")
    return path


class Repo:
    """One repository on disk: ``blobs/<sha256>``, ``commits/<oid>.json`` (its whole file map) and ``refs/main``."""

    def __init__(self, root: Path, repo_type: str, repo_id: str):
        self.repo_type, self.repo_id = repo_type, repo_id
        self.path = root / f"{repo_type}s" / repo_id

    def exists(self) -> bool:
        return (self.path / "refs" / BRANCH).is_file()

    def head(self) -> str:
        return (self.path / "refs" / BRANCH).read_text().strip()

    def commit(self, oid: str) -> dict:
        path = self.path / "commits" / f"{oid}.json"
        if not path.is_file():
            raise HubError(404, f"revision {oid} not found in {self.repo_id}", "RevisionNotFound")
        return json.loads(path.read_text())

    def resolve(self, revision: str) -> dict:
        """The commit a branch name or commit id points to."""
        revision = unquote(revision)
        if revision == BRANCH:
            return self.commit(self.head())
        if COMMIT_OID.match(revision):
            return self.commit(revision)
        raise HubError(404, f"revision {revision!r} not found in {self.repo_id} (this endpoint has the branch "
                            f"{BRANCH!r} and commit ids)", "RevisionNotFound")

    def blob(self, sha256: str) -> bytes:
        return (self.path / "blobs" / sha256).read_bytes()

    def store_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.path / "blobs" / sha256
        if not path.is_file():
            write_atomically(path, content)
        return sha256

    def record(self, parent: str | None, files: dict, summary: str, description: str) -> str:
        """Store a commit record and move the branch to it (the one step that makes a commit visible)."""
        body = {"parent": parent, "files": files, "summary": summary, "description": description,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        oid = hashlib.sha1(json.dumps(body, sort_keys=True).encode() + os.urandom(8)).hexdigest()
        write_atomically(self.path / "commits" / f"{oid}.json", json.dumps({"oid": oid, **body}).encode())
        write_atomically(self.path / "refs" / BRANCH, oid.encode())
        return oid


class LocalHub:
    """The endpoint's state: a root folder of repos, an optional token and fault injection for tests."""

    def __init__(self, root: str | Path, token: str | None = None):
        self.root = Path(root)
        self.token = token  # None: any token (or none) is accepted
        self.lock = threading.Lock()  # one commit (or repo creation) at a time
        self.fail_commit_after_files: int | None = None  # tests: break the next commit after storing this many

    def repo(self, repo_type: str, repo_id: str, must_exist: bool = True) -> Repo:
        owner, _, name = repo_id.partition("/")
        if not (NAME.match(owner) and NAME.match(name)) or ".." in repo_id:
            raise HubError(400, f"invalid repo id {repo_id!r}: expected 'owner/name'")
        repo = Repo(self.root, repo_type, repo_id)
        if must_exist and not repo.exists():
            raise HubError(404, f"repository {repo_id!r} not found", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            repo = self.repo(repo_type, repo_id, must_exist=False)
            if repo.exists():
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            (repo.path).mkdir(parents=True, exist_ok=True)
            write_atomically(repo.path / "repo.json", json.dumps({"private": private}).encode())
            repo.record(None, {}, "initial commit", "")
            return repo

    def commit(self, repo: Repo, revision: str, lines: list[dict]) -> str:
        """Apply one NDJSON commit atomically; returns the new commit id."""
        if unquote(revision) != BRANCH:
            raise HubError(400, f"commits go to the branch {BRANCH!r} only, not {unquote(revision)!r}")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with its header line")
        header = lines[0].get("value") or {}
        additions, deletions = {}, []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                try:
                    additions[check_repo_path(value.get("path", ""))] = base64.b64decode(value["content"],
                                                                                       validate=True)
                except (KeyError, binascii.Error, TypeError):
                    raise HubError(400, f"file {value.get('path')!r}: content is not base64") from None
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((key, check_repo_path(value.get("path", "").rstrip("/"))))
            else:
                raise HubError(400, f"operation {key!r} is not supported by this endpoint (regular uploads only: "
                                    "no LFS, Xet or copies)")
        with self.lock:
            head = repo.head()
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, f"parentCommit {parent} is not the head of {BRANCH} ({head})")
            files = dict(repo.commit(head)["files"])
            for key, path in deletions:
                doomed = [p for p in files if p == path or (key == "deletedFolder" and p.startswith(path + "/"))]
                if not doomed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            for stored, (path, content) in enumerate(additions.items()):
                if self.fail_commit_after_files is not None and stored >= self.fail_commit_after_files:
                    self.fail_commit_after_files = None
                    raise HubError(500, f"injected failure after storing {stored} file(s) of the commit")
                files[path] = {"sha256": repo.store_blob(content), "size": len(content),
                               "oid": git_blob_oid(content)}
            return repo.record(head, files, header.get("summary", ""), header.get("description", ""))


def tree_entries(files: dict, prefix: str, recursive: bool) -> list[dict]:
    """The files (and, unless recursive, the immediate folders) under ``prefix`` as the tree API lists them."""
    base = prefix.rstrip("/") + "/" if prefix else ""
    entries, folders = [], set()
    for path in sorted(files):
        if not path.startswith(base):
            continue
        rest = path[len(base):].split("/")
        if recursive or len(rest) == 1:
            entries.append(file_entry(path, files[path]))
        else:
            folders.add(base + rest[0])
        if recursive:
            folders.update("/".join(path.split("/")[:i]) for i in range(base.count("/") + 1, path.count("/") + 1))
    entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                for f in sorted(folders) if f]
    return entries


def file_entry(path: str, info: dict) -> dict:
    return {"type": "file", "oid": info["oid"], "size": info["size"], "path": path}


def validate_card_yaml(content: str) -> tuple[list[str], list[str]]:
    """Errors and warnings for a README's YAML header, checking the metadata fields the Hub types."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not match:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"the YAML header does not parse: {err}"], []
    if meta is None:
        return [], ["empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["the YAML header must be a mapping"], []
    errors = []
    for key in ("license", "library_name", "pipeline_tag", "model_name"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language", "metrics", "base_model"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    index = meta.get("model-index")
    if index is not None and not (isinstance(index, list) and all(isinstance(m, dict) and "name" in m and
                                                                    isinstance(m.get("results"), list)
                                                                    for m in index)):
        errors.append('"model-index" must be a list of {name, results: [...]}')
    return errors, []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pfedseq-local-hub"
    hub: LocalHub  # set on the subclass the server makes

    def log_message(self, format, *args):  # noqa: A002 - quiet by default; the tests read answers, not logs
        if os.environ.get("PFEDSEQ_HUB_LOG"):
            super().log_message(format, *args)

    # --- plumbing -------------------------------------------------------------------------------------------
    def send(self, status: int, body: bytes = b"", content_type: str = "application/json",
             headers: dict | None = None, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def send_json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(value).encode(), headers=headers)

    def fail(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " ")}
        if err.code:
            headers["X-Error-Code"] = err.code
        self.send(err.status, json.dumps({"error": err.message}).encode(), headers=headers,
                  head_only=self.command == "HEAD")

    def body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HubError(411, "a Content-Length is required")
        data = self.rfile.read(int(length))
        if len(data) != int(length):
            self.close_connection = True
            raise HubError(400, f"the request body broke off after {len(data)} of {length} bytes; nothing stored")
        return data

    def json_body(self):
        try:
            return json.loads(self.body() or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"the request body is not JSON: {err}") from None

    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def check_token(self) -> None:
        """With a token set, every route but validate-yaml (which the Hub answers anonymously) needs it; a missing
        token and a wrong one are told apart, so that a rehearsal shows which one a push lacked."""
        if self.hub.token is None:
            return
        sent = self.headers.get("Authorization", "")
        if not sent:
            raise HubError(401, "this endpoint requires a token (it was started with --token) and the request sent "
                                "none: set HF_TOKEN or pass token=")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.hub.token}".encode()):
            raise HubError(401, "Invalid credentials in Authorization header")

    def dispatch(self) -> None:
        try:
            self.route(urlsplit(self.path))
        except HubError as err:
            self.fail(err)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a bug in a route answers 500 instead of hanging the client
            self.fail(HubError(500, f"internal error: {type(err).__name__}: {err}"))

    do_GET = do_HEAD = do_POST = do_DELETE = lambda self: self.dispatch()  # noqa: E731

    # --- routes ---------------------------------------------------------------------------------------------
    def route(self, url) -> None:
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        method = self.command
        if parts[:1] == ["api"]:
            return self.api(method, parts[1:], query)
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            self.check_token()
            repo = self.hub.repo(repo_type, "/".join(parts[:2]))
            return self.resolve(repo, parts[3], "/".join(parts[4:]), head_only=method == "HEAD")
        raise HubError(404, f"no route for {method} {url.path}")

    def api(self, method: str, parts: list[str], query: dict) -> None:
        if method == "POST" and parts == ["repos", "create"]:
            self.check_token()
            data = self.json_body()
            repo_id = f"{data.get('organization') or 'local-user'}/{data.get('name')}"
            repo_type = data.get("type") or "model"
            private = bool(data.get("private")) or data.get("visibility") == "private"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{self.base_url()}/{prefix}{repo_id}"
            try:
                self.hub.create(repo_type, repo_id, private)
            except HubError as err:
                if err.status != 409:
                    raise
                return self.send_json({"error": err.message, "url": url}, 409,  # the Hub names the existing repo
                                      headers={"X-Error-Message": err.message})
            return self.send_json({"url": url, "name": repo_id, "id": repo_id})
        if method in ("POST", "DELETE") and parts == ["repos", "delete"]:
            self.check_token()
            data = self.json_body()
            repo = self.hub.repo(data.get("type") or "model", f"{data.get('organization')}/{data.get('name')}")
            with self.hub.lock:
                os.replace(repo.path, repo.path.with_name(f".deleted-{repo.path.name}-{time.time_ns()}"))
            return self.send_json({})
        if method == "POST" and parts == ["validate-yaml"]:
            errors, warnings = validate_card_yaml(self.json_body().get("content", ""))
            payload = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
            return self.send_json(payload, 400 if errors else 200)
        if method == "GET" and parts == ["whoami-v2"]:
            self.check_token()
            return self.send_json({"type": "user", "name": "local-user", "orgs": [],
                                   "auth": {"accessToken": {"role": "write"}}})
        if len(parts) >= 3 and parts[0] in REPO_TYPES:
            self.check_token()
            repo = self.hub.repo(REPO_TYPES[parts[0]], f"{parts[1]}/{parts[2]}")
            return self.repo_api(method, repo, parts[3:], query)
        raise HubError(404, f"no route for {method} /api/{'/'.join(parts)}")

    def repo_api(self, method: str, repo: Repo, rest: list[str], query: dict) -> None:
        action = rest[0] if rest else ""
        if method == "GET" and (not rest or action == "revision"):
            commit = repo.resolve("/".join(rest[1:]) if rest else BRANCH)
            return self.send_json(self.info(repo, commit))
        if method == "POST" and action == "preupload":
            files = repo.resolve("/".join(rest[1:]))["files"]
            listed = self.json_body().get("files", [])
            return self.send_json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 **({"oid": files[f["path"]]["oid"]} if f["path"] in files else {})} for f in listed]})
        if method == "POST" and action == "commit":
            if query.get("create_pr", ["0"])[0] not in ("0", "", "false"):
                raise HubError(400, "pull requests are not supported by this endpoint")
            try:
                lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise HubError(400, f"the commit is not NDJSON: {err}; nothing stored") from None
            oid = self.hub.commit(repo, "/".join(rest[1:]), lines)
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            return self.send_json({"success": True, "commitOid": oid, "pullRequestUrl": None,
                                   "commitUrl": f"{self.base_url()}/{prefix}{repo.repo_id}/commit/{oid}"})
        if method == "GET" and action == "tree" and len(rest) >= 2:
            commit = repo.resolve(rest[1])
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self.send_json(tree_entries(commit["files"], "/".join(rest[2:]), recursive))
        if method == "POST" and action == "paths-info" and len(rest) >= 2:
            files = repo.resolve(rest[1])["files"]
            raw = self.body()
            try:
                paths = json.loads(raw).get("paths", [])
            except json.JSONDecodeError:
                paths = parse_qs(raw.decode()).get("paths", [])
            found = [file_entry(p, files[p]) for p in paths if p in files]
            found += [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                      for p in paths if p not in files and any(f.startswith(p.rstrip("/") + "/") for f in files)]
            return self.send_json(found)
        if method == "GET" and action == "refs":
            head = repo.head()
            return self.send_json({"branches": [{"name": BRANCH, "ref": f"refs/heads/{BRANCH}",
                                                 "targetCommit": head}], "tags": [], "converts": []})
        if method == "GET" and action == "commits":
            oid, history = repo.resolve(rest[1] if len(rest) > 1 else BRANCH)["oid"], []
            while oid:
                commit = repo.commit(oid)
                history.append({"id": oid, "title": commit["summary"], "message": commit["description"],
                                "authors": [{"user": "local-user"}], "date": commit["date"]})
                oid = commit["parent"]
            return self.send_json(history)
        raise HubError(404, f"no route for {method} {self.path}")

    def info(self, repo: Repo, commit: dict) -> dict:
        private = json.loads((repo.path / "repo.json").read_text()).get("private", False)
        return {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": commit["oid"], "lastModified": commit["date"], "private": private, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": p, "size": i["size"]} for p, i in sorted(commit["files"].items())]}

    def resolve(self, repo: Repo, revision: str, path: str, head_only: bool) -> None:
        commit = repo.resolve(revision)
        info = commit["files"].get(path)
        if info is None:
            raise HubError(404, f"Entry not found: {path} at {commit['oid']}", "EntryNotFound")
        content = b"" if head_only else repo.blob(info["sha256"])
        headers = {"X-Repo-Commit": commit["oid"], "ETag": f'"{info["oid"]}"', "Accept-Ranges": "none"}
        if head_only:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(info["size"]))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        self.send(200, content, "application/octet-stream", headers)


class LocalHubServer:
    """The endpoint on a background thread::

        with LocalHubServer(root) as hub:
            os.environ["HF_ENDPOINT"] = hub.url  # before huggingface_hub is imported, or pass endpoint=hub.url
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.hub = LocalHub(root, token)
        handler = type("BoundHandler", (Handler,), {"hub": self.hub})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHubServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pfedseq-local-hub", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8808, token: str | None = None) -> None:
    """Serve in the foreground until interrupted."""
    server = LocalHubServer(root, host, port, token)
    print(f"local Hub endpoint serving {Path(root).resolve()}\n  export HF_ENDPOINT={server.url}\n"
          f"  export HF_TOKEN={token or 'anything'}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder that holds the repos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8808)
    parser.add_argument("--token", default=None, help="require this token (default: accept any)")
    args = parser.parse_args(argv)
    serve(args.root, args.host, args.port, args.token)


if __name__ == "__main__":
    main()
