"""Wire-level tests of Amphora's COMET-compatible API (shared/design/COMET-API.md).

Every test drives a real `amphora serve` process over real HTTP and talks to it the
way the COMET Python client does:

* ``host = base_url + "/"`` and URLs built as ``host + "/readScope"``, so the path
  arrives as ``//readScope``;
* query parameters passed through ``requests``' ``params=`` dict;
* ``Accept: application/json`` on every request;
* writeScope bodies posted with ``json=`` (``{"val_": "<json text>"}``), as text/plain,
  or with no Content-Type at all.

The server binary is taken from ``$AMPHORA_BIN`` (default
``target/debug/amphora`` in this repository). Each server runs on an ephemeral port with a
temporary data directory; every test uses its own fresh context name.
"""

import json
import os
import select
import signal
import subprocess
import time
import uuid

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AMPHORA_BIN = os.environ.get("AMPHORA_BIN", os.path.join(REPO, "target", "debug", "amphora"))

COMET_VERSION = "1.0.5"
COMET_API_VERSION = "1.0.0"
ACCEPT = {"Accept": "application/json"}
TIMEOUT = 10  # seconds, for every HTTP request

# Strong tokens: >= 8 chars, a digit, a lower- and an upper-case letter, no white space.
READ_TOKEN = "ReadTok3n-Alpha"
WRITE_TOKEN = "WriteTok3n-Alpha"
OTHER_READ_TOKEN = "ReadTok3n-Bravo"
OTHER_WRITE_TOKEN = "WriteTok3n-Bravo"

NODE_VALUE = [{"hostName": "n1", "ip": "10.0.0.1"}]
# What `requests` sends for json={"val_": json.dumps(NODE_VALUE)}.
NODE_BODY = '{"val_": "[{\\"hostName\\": \\"n1\\", \\"ip\\": \\"10.0.0.1\\"}]"}'


# --------------------------------------------------------------------------- server


class Server:
    """One `amphora serve` process on an ephemeral loopback port."""

    def __init__(self, tmp_path, *extra_args):
        if not os.path.exists(AMPHORA_BIN):
            pytest.fail(
                f"server binary {AMPHORA_BIN} not found: build it with "
                "`cargo build -p amphora-server` or set AMPHORA_BIN"
            )
        self.data_dir = tmp_path / "data"
        self.data_dir.mkdir()
        self.log_path = tmp_path / "amphora.log"
        self._log = open(self.log_path, "wb")
        # The server also reads AMPHORA_* and COMET_* from the environment: keep the
        # tests hermetic by passing only what they say on the command line.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AMPHORA_") and not k.startswith("COMET_")
        }
        self.proc = subprocess.Popen(
            [
                AMPHORA_BIN,
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                "127.0.0.1:0",
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        try:
            self.base = self._read_url(deadline=time.monotonic() + 30)
        except BaseException:
            self.stop()
            raise
        # What the COMET client calls `host`: note the trailing slash.
        self.host = self.base + "/"

    def _read_url(self, deadline):
        prefix = "amphora listening on "
        line = b""
        fd = self.proc.stdout.fileno()
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"server did not announce its URL in time\n{self.logs()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1)
            if not chunk:
                raise RuntimeError(
                    f"server exited before announcing its URL "
                    f"(rc={self.proc.poll()})\n{self.logs()}"
                )
            line += chunk
        text = line.decode().strip()
        assert text.startswith(prefix + "http://127.0.0.1:"), text
        return text[len(prefix):].rstrip("/")

    def logs(self):
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("amphora"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lenient_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("amphora-weak"), "--check-token-strength", "false")
    yield s
    s.stop()


@pytest.fixture
def expiry_server(tmp_path):
    s = Server(tmp_path, "--idle-expiry", "2s")
    yield s
    s.stop()


# --------------------------------------------------------------------------- client


class Comet:
    """The calls of the COMET Python client, against `host` (which ends in `/`)."""

    def __init__(self, host, headers=ACCEPT):
        self.host = host
        self.headers = dict(headers)

    def write(self, ctx, family, key, read, write, value=None, **kw):
        params = {
            "contextID": ctx,
            "family": family,
            "Key": key,
            "readToken": read,
            "writeToken": write,
        }
        if value is not None:
            kw.setdefault("json", {"val_": json.dumps(value)})
        return requests.post(
            self.host + "/writeScope",
            params=params,
            headers={**self.headers, **kw.pop("headers", {})},
            timeout=TIMEOUT,
            **kw,
        )

    def read(self, ctx, family, key, read):
        params = {"contextID": ctx, "family": family, "Key": key, "readToken": read}
        return requests.get(
            self.host + "/readScope", params=params, headers=self.headers, timeout=TIMEOUT
        )

    def enumerate(self, ctx, read, family=None):
        params = {"contextID": ctx, "readToken": read}
        if family is not None:
            params["family"] = family
        return requests.get(
            self.host + "/enumerateScope", params=params, headers=self.headers, timeout=TIMEOUT
        )

    def delete(self, ctx, family, key, read, write):
        params = {
            "contextID": ctx,
            "family": family,
            "Key": key,
            "readToken": read,
            "writeToken": write,
        }
        return requests.delete(
            self.host + "/deleteScope", params=params, headers=self.headers, timeout=TIMEOUT
        )

    def version(self):
        return requests.get(self.host + "/getVersion", headers=self.headers, timeout=TIMEOUT)


@pytest.fixture
def comet(server):
    return Comet(server.host)


@pytest.fixture
def ctx():
    """A fresh context name per test (the servers are shared within the module)."""
    return "ctx-" + uuid.uuid4().hex


def body_text(resp):
    """The exact body bytes a request sent, as text."""
    body = resp.request.body
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    return body


def ok_envelope(resp):
    """Asserts HTTP 200 with a success envelope; returns its value."""
    assert resp.status_code == 200, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    env = resp.json()
    assert set(env) == {"status", "message", "value", "version"}, env
    assert env["status"] == "OK", env
    assert env["message"] == "success", env
    assert env["version"] == COMET_VERSION, env
    assert isinstance(env["value"], dict), env
    return env["value"]


def error_envelope(resp, status):
    """Asserts an error status with the COMET envelope; returns the envelope."""
    assert resp.status_code == status, (
        resp.request.method,
        resp.request.url,
        resp.status_code,
        resp.text,
    )
    env = resp.json()
    assert set(env) == {"status", "message", "value", "version"}, env
    assert env["status"] != "OK", env
    assert env["version"] == COMET_VERSION, env
    assert isinstance(env["message"], str) and env["message"], env
    return env


def assert_written(resp):
    value = ok_envelope(resp)
    assert set(value) == {"Success"}, value
    assert isinstance(value["Success"], str), value


def assert_reads(comet, ctx, family, key, read, expected):
    value = ok_envelope(comet.read(ctx, family, key, read))
    assert value == {"contextId": ctx, "family": family, "key": key, "value": expected}


def assert_absent(comet, ctx, family, key, read):
    value = ok_envelope(comet.read(ctx, family, key, read))
    assert value == {}
    assert len(value) == 0


# --------------------------------------------------------------------------- getVersion


def test_get_version(comet):
    resp = comet.version()
    assert "//getVersion" in resp.request.url
    assert ok_envelope(resp) == {
        "Comet version": COMET_VERSION,
        "Comet API version": COMET_API_VERSION,
    }
    assert resp.json() == {
        "status": "OK",
        "message": "success",
        "value": {"Comet version": "1.0.5", "Comet API version": "1.0.0"},
        "version": "1.0.5",
    }


# --------------------------------------------------------------------------- writeScope / readScope


def test_write_json_body_then_read_verbatim(comet, ctx):
    resp = comet.write(ctx, "nodes", "n1", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    # The client's URL really has the doubled slash.
    assert "//writeScope?" in resp.request.url
    assert resp.request.headers["Content-Type"] == "application/json"
    sent = body_text(resp)
    assert sent == NODE_BODY
    assert_written(resp)

    resp = comet.read(ctx, "nodes", "n1", READ_TOKEN)
    assert "//readScope?" in resp.request.url
    assert resp.json() == {
        "status": "OK",
        "message": "success",
        "value": {"contextId": ctx, "family": "nodes", "key": "n1", "value": sent},
        "version": "1.0.5",
    }
    # What the COMET client then does with it.
    stored = resp.json()["value"]["value"]
    assert json.loads(json.loads(stored)["val_"]) == NODE_VALUE


def test_write_json_body_with_data_and_content_type(comet, ctx):
    body = json.dumps({"val_": json.dumps(NODE_VALUE)})
    resp = comet.write(
        ctx,
        "nodes",
        "n1",
        READ_TOKEN,
        WRITE_TOKEN,
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert_written(resp)
    assert body_text(resp) == body
    assert_reads(comet, ctx, "nodes", "n1", READ_TOKEN, body)


def test_write_text_plain_stored_verbatim(comet, ctx):
    body = "plain text:  not JSON {[\"  \n\ttab, and unicode é ✓"
    resp = comet.write(
        ctx,
        "fam",
        "key",
        READ_TOKEN,
        WRITE_TOKEN,
        data=body.encode("utf-8"),
        headers={"Content-Type": "text/plain"},
    )
    assert resp.request.headers["Content-Type"] == "text/plain"
    assert_written(resp)
    assert_reads(comet, ctx, "fam", "key", READ_TOKEN, body)


def test_write_without_content_type_stored_verbatim(comet, ctx):
    body = '{"val_": "no content type", "n": [1, 2.50, true]}'
    resp = comet.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, data=body.encode("utf-8"))
    assert "Content-Type" not in resp.request.headers
    assert_written(resp)
    assert_reads(comet, ctx, "fam", "key", READ_TOKEN, body)


def test_write_json_that_is_not_canonical_kept_byte_for_byte(comet, ctx):
    # Whitespace, key order and escapes that a JSON re-serialization would change.
    body = '{ "val_" :"[]",\n  "a":1.0, "a2": "\\u00e9\\/" }'
    resp = comet.write(
        ctx,
        "fam",
        "key",
        READ_TOKEN,
        WRITE_TOKEN,
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert_written(resp)
    assert_reads(comet, ctx, "fam", "key", READ_TOKEN, body)


def test_empty_string_value(comet, ctx):
    resp = comet.write(
        ctx,
        "fam",
        "key",
        READ_TOKEN,
        WRITE_TOKEN,
        data=json.dumps(""),
        headers={"Content-Type": "application/json"},
    )
    assert body_text(resp) == '""'
    assert_written(resp)
    value = ok_envelope(comet.read(ctx, "fam", "key", READ_TOKEN))
    # The COMET client's test for an empty value.
    assert value["value"] == "\"\""
    assert value == {"contextId": ctx, "family": "fam", "key": "key", "value": '""'}


def test_read_missing_entry_answers_empty_value(comet, ctx):
    resp = comet.read(ctx, "fam", "nothing-here", READ_TOKEN)
    assert resp.json() == {"status": "OK", "message": "success", "value": {}, "version": "1.0.5"}
    assert len(ok_envelope(resp)) == 0


def test_read_wrong_read_token_answers_empty_value(comet, ctx):
    assert_written(comet.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, "secret"))
    assert_absent(comet, ctx, "fam", "key", OTHER_READ_TOKEN)
    # The write token is not a read token either.
    assert_absent(comet, ctx, "fam", "key", WRITE_TOKEN)
    # The right one still sees it.
    assert_reads(comet, ctx, "fam", "key", READ_TOKEN, json.dumps({"val_": '"secret"'}))


def test_missing_accept_header_is_tolerated(server, ctx):
    bare = Comet(server.host, headers={})
    resp = bare.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, data=b"no accept")
    assert "Accept" not in resp.request.headers or resp.request.headers["Accept"] == "*/*"
    assert_written(resp)
    assert_reads(bare, ctx, "fam", "key", READ_TOKEN, "no accept")
    assert ok_envelope(bare.version())["Comet version"] == COMET_VERSION


# --------------------------------------------------------------------------- modify


def test_modify_with_same_tokens_changes_value(comet, ctx):
    first = comet.write(ctx, "nodes", "n1", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    assert_written(first)
    assert_reads(comet, ctx, "nodes", "n1", READ_TOKEN, body_text(first))

    new_value = [{"hostName": "n1", "ip": "10.0.0.2", "state": "ready"}]
    second = comet.write(ctx, "nodes", "n1", READ_TOKEN, WRITE_TOKEN, new_value)
    assert_written(second)
    assert body_text(second) != body_text(first)
    assert_reads(comet, ctx, "nodes", "n1", READ_TOKEN, body_text(second))


def test_one_token_pair_for_a_whole_context(comet, ctx):
    # Provisioning tools use one read and one write token for every entry of a context.
    bodies = {}
    for family in ("hosts", "keys"):
        for node in ("n1", "n2", "n3"):
            resp = comet.write(ctx, family, node, READ_TOKEN, WRITE_TOKEN, [family, node])
            assert_written(resp)
            bodies[(family, node)] = body_text(resp)
    # A node then modifies "its" entry with the same tokens.
    resp = comet.write(ctx, "keys", "n2", READ_TOKEN, WRITE_TOKEN, ["keys", "n2", "updated"])
    assert_written(resp)
    bodies[("keys", "n2")] = body_text(resp)
    for (family, node), body in bodies.items():
        assert_reads(comet, ctx, family, node, READ_TOKEN, body)


def test_modify_with_wrong_write_token_is_refused_and_changes_nothing(comet, ctx):
    first = comet.write(ctx, "nodes", "n1", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    assert_written(first)
    resp = comet.write(ctx, "nodes", "n1", READ_TOKEN, OTHER_WRITE_TOKEN, ["overwritten"])
    error_envelope(resp, 403)
    assert_reads(comet, ctx, "nodes", "n1", READ_TOKEN, body_text(first))
    # Nor can the other token pair see or take over the entry.
    assert_absent(comet, ctx, "nodes", "n1", OTHER_READ_TOKEN)


def test_modify_with_wrong_read_token_is_refused_and_changes_nothing(comet, ctx):
    first = comet.write(ctx, "nodes", "n1", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    assert_written(first)
    resp = comet.write(ctx, "nodes", "n1", OTHER_READ_TOKEN, WRITE_TOKEN, ["overwritten"])
    error_envelope(resp, 403)
    assert_reads(comet, ctx, "nodes", "n1", READ_TOKEN, body_text(first))
    assert_absent(comet, ctx, "nodes", "n1", OTHER_READ_TOKEN)
    # Both tokens wrong: refused as well.
    resp = comet.write(ctx, "nodes", "n1", OTHER_READ_TOKEN, OTHER_WRITE_TOKEN, ["overwritten"])
    error_envelope(resp, 403)
    assert_reads(comet, ctx, "nodes", "n1", READ_TOKEN, body_text(first))


# --------------------------------------------------------------------------- enumerateScope


def _write_many(comet, ctx, entries, read=READ_TOKEN, write=WRITE_TOKEN):
    bodies = {}
    for family, key in entries:
        resp = comet.write(ctx, family, key, read, write, {"f": family, "k": key})
        assert_written(resp)
        bodies[(family, key)] = body_text(resp)
    return bodies


def test_enumerate_with_family(comet, ctx):
    bodies = _write_many(comet, ctx, [("hosts", "n1"), ("hosts", "n2"), ("keys", "n1")])
    value = ok_envelope(comet.enumerate(ctx, READ_TOKEN, family="hosts"))
    assert set(value) == {"contextId", "family", "entries"}, value
    assert value["contextId"] == ctx
    assert value["family"] == "hosts"
    assert sorted(value["entries"], key=lambda e: e["key"]) == [
        {"key": "n1", "value": bodies[("hosts", "n1")]},
        {"key": "n2", "value": bodies[("hosts", "n2")]},
    ]


def test_enumerate_without_family(comet, ctx):
    bodies = _write_many(comet, ctx, [("hosts", "n1"), ("hosts", "n2"), ("keys", "n1")])
    value = ok_envelope(comet.enumerate(ctx, READ_TOKEN))
    assert set(value) == {"contextId", "entries"}, value
    assert value["contextId"] == ctx
    assert sorted(value["entries"], key=lambda e: (e["family"], e["key"])) == [
        {"family": "hosts", "key": "n1", "value": bodies[("hosts", "n1")]},
        {"family": "hosts", "key": "n2", "value": bodies[("hosts", "n2")]},
        {"family": "keys", "key": "n1", "value": bodies[("keys", "n1")]},
    ]


def test_enumerate_lists_only_entries_of_this_read_token(comet, ctx):
    mine = _write_many(comet, ctx, [("hosts", "n1"), ("keys", "n1")])
    theirs = _write_many(
        comet,
        ctx,
        [("hosts", "n2"), ("keys", "n2")],
        read=OTHER_READ_TOKEN,
        write=OTHER_WRITE_TOKEN,
    )
    # Another context with the same tokens is not listed either.
    other_ctx = ctx + "-other"
    _write_many(comet, other_ctx, [("hosts", "n9")])

    value = ok_envelope(comet.enumerate(ctx, READ_TOKEN))
    assert value["contextId"] == ctx
    assert sorted(value["entries"], key=lambda e: (e["family"], e["key"])) == [
        {"family": "hosts", "key": "n1", "value": mine[("hosts", "n1")]},
        {"family": "keys", "key": "n1", "value": mine[("keys", "n1")]},
    ]
    value = ok_envelope(comet.enumerate(ctx, OTHER_READ_TOKEN, family="hosts"))
    assert value == {
        "contextId": ctx,
        "family": "hosts",
        "entries": [{"key": "n2", "value": theirs[("hosts", "n2")]}],
    }
    value = ok_envelope(comet.enumerate(ctx, "Unkn0wnReader"))
    assert value == {"contextId": ctx, "entries": []}


def test_enumerate_empty_context(comet, ctx):
    assert ok_envelope(comet.enumerate(ctx, READ_TOKEN)) == {"contextId": ctx, "entries": []}
    assert ok_envelope(comet.enumerate(ctx, READ_TOKEN, family="hosts")) == {
        "contextId": ctx,
        "family": "hosts",
        "entries": [],
    }


# --------------------------------------------------------------------------- deleteScope


def test_delete_then_read_answers_empty(comet, ctx):
    assert_written(comet.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, NODE_VALUE))
    resp = comet.delete(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN)
    assert "//deleteScope?" in resp.request.url
    assert resp.json() == {
        "status": "OK",
        "message": "success",
        "value": {"Success": "Scope deleted"},
        "version": "1.0.5",
    }
    assert_absent(comet, ctx, "fam", "key", READ_TOKEN)
    assert ok_envelope(comet.enumerate(ctx, READ_TOKEN)) == {"contextId": ctx, "entries": []}


def test_delete_with_wrong_write_token_is_refused(comet, ctx):
    first = comet.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    assert_written(first)
    error_envelope(comet.delete(ctx, "fam", "key", READ_TOKEN, OTHER_WRITE_TOKEN), 403)
    assert_reads(comet, ctx, "fam", "key", READ_TOKEN, body_text(first))


def test_delete_with_wrong_read_token_is_refused(comet, ctx):
    first = comet.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    assert_written(first)
    resp = comet.delete(ctx, "fam", "key", OTHER_READ_TOKEN, WRITE_TOKEN)
    error_envelope(resp, 403)
    assert_reads(comet, ctx, "fam", "key", READ_TOKEN, body_text(first))


def test_write_after_delete_creates_afresh_with_new_tokens(comet, ctx):
    assert_written(comet.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, ["old"]))
    ok_envelope(comet.delete(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN))

    resp = comet.write(ctx, "fam", "key", OTHER_READ_TOKEN, OTHER_WRITE_TOKEN, ["new"])
    assert_written(resp)
    assert_reads(comet, ctx, "fam", "key", OTHER_READ_TOKEN, body_text(resp))
    # The old tokens are gone with the old entry.
    assert_absent(comet, ctx, "fam", "key", READ_TOKEN)
    error_envelope(comet.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, ["hijack"]), 403)
    error_envelope(comet.delete(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN), 403)
    assert_reads(comet, ctx, "fam", "key", OTHER_READ_TOKEN, body_text(resp))


# --------------------------------------------------------------------------- /v1/ prefix


@pytest.mark.parametrize("prefix", ["v1", "v1/"], ids=["v1-slash-call", "v1-double-slash"])
def test_routes_under_v1_prefix(server, ctx, prefix):
    # "v1": base + "/v1/readScope"; "v1/": base + "/v1//readScope" (a host ending in /).
    v1 = Comet(server.base + "/" + prefix)
    resp = v1.version()
    assert ok_envelope(resp) == {"Comet version": "1.0.5", "Comet API version": "1.0.0"}

    resp = v1.write(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    assert "/v1/" in resp.request.url
    assert_written(resp)
    body = body_text(resp)
    assert_reads(v1, ctx, "fam", "key", READ_TOKEN, body)
    # The same store as the unprefixed routes.
    assert_reads(Comet(server.host), ctx, "fam", "key", READ_TOKEN, body)

    assert ok_envelope(v1.enumerate(ctx, READ_TOKEN)) == {
        "contextId": ctx,
        "entries": [{"family": "fam", "key": "key", "value": body}],
    }
    assert ok_envelope(v1.enumerate(ctx, READ_TOKEN, family="fam")) == {
        "contextId": ctx,
        "family": "fam",
        "entries": [{"key": "key", "value": body}],
    }
    error_envelope(v1.write(ctx, "fam", "key", READ_TOKEN, OTHER_WRITE_TOKEN, ["x"]), 403)
    assert ok_envelope(v1.delete(ctx, "fam", "key", READ_TOKEN, WRITE_TOKEN)) == {
        "Success": "Scope deleted"
    }
    assert_absent(v1, ctx, "fam", "key", READ_TOKEN)


# --------------------------------------------------------------------------- 400s


CALLS = {
    "writeScope": ("POST", ["contextID", "family", "Key", "readToken", "writeToken"]),
    "readScope": ("GET", ["contextID", "family", "Key", "readToken"]),
    "enumerateScope": ("GET", ["contextID", "readToken"]),
    "deleteScope": ("DELETE", ["contextID", "family", "Key", "readToken", "writeToken"]),
}
MISSING_CASES = [
    (call, param, how)
    for call, (_, params) in CALLS.items()
    for param in params
    for how in ("missing", "empty")
]


@pytest.mark.parametrize(
    "call,param,how", MISSING_CASES, ids=[f"{c}-{p}-{h}" for c, p, h in MISSING_CASES]
)
def test_missing_or_empty_required_parameter(server, ctx, call, param, how):
    method, names = CALLS[call]
    params = {
        "contextID": ctx,
        "family": "fam",
        "Key": "key",
        "readToken": READ_TOKEN,
        "writeToken": WRITE_TOKEN,
    }
    params = {n: params[n] for n in names}
    if how == "missing":
        del params[param]
    else:
        params[param] = ""
    kw = {"json": {"val_": "x"}} if method == "POST" else {}
    resp = requests.request(
        method, server.host + "/" + call, params=params, headers=ACCEPT, timeout=TIMEOUT, **kw
    )
    env = error_envelope(resp, 400)
    assert param in env["message"], env
    # A refused call changed nothing.
    if call == "writeScope":
        _assert_name_still_free(Comet(server.host), ctx)
    else:
        assert_absent(Comet(server.host), ctx, "fam", "key", READ_TOKEN)


def test_equal_read_and_write_tokens_refused(comet, ctx):
    resp = comet.write(ctx, "fam", "key", READ_TOKEN, READ_TOKEN, NODE_VALUE)
    env = error_envelope(resp, 400)
    assert env["message"] == "Invalid tokens: read and write token cannot be the same", env
    _assert_name_still_free(comet, ctx)


def test_equal_tokens_refused_even_without_strength_check(lenient_server, ctx):
    comet = Comet(lenient_server.host)
    resp = comet.write(ctx, "fam", "key", "same", "same", NODE_VALUE)
    env = error_envelope(resp, 400)
    assert env["message"] == "Invalid tokens: read and write token cannot be the same", env


def _assert_name_still_free(comet, ctx):
    """A refused writeScope created nothing: other tokens can create the entry."""
    resp = comet.write(ctx, "fam", "key", OTHER_READ_TOKEN, OTHER_WRITE_TOKEN, ["fresh"])
    assert_written(resp)
    assert_reads(comet, ctx, "fam", "key", OTHER_READ_TOKEN, body_text(resp))


WEAK_TOKENS = {
    "too-short": "Ab1cdef",
    "no-digit": "Abcdefghij",
    "no-lower": "ABCDEFGH12",
    "no-upper": "abcdefgh12",
    "space": "Abcd efgh12",
    "tab": "Abcd\tefgh12",
}


@pytest.mark.parametrize("weak", list(WEAK_TOKENS.values()), ids=list(WEAK_TOKENS))
def test_weak_read_token_refused(comet, ctx, weak):
    resp = comet.write(ctx, "fam", "key", weak, WRITE_TOKEN, NODE_VALUE)
    env = error_envelope(resp, 400)
    assert env["message"].startswith("Read token not strong enough"), env
    _assert_name_still_free(comet, ctx)


@pytest.mark.parametrize("weak", list(WEAK_TOKENS.values()), ids=list(WEAK_TOKENS))
def test_weak_write_token_refused(comet, ctx, weak):
    resp = comet.write(ctx, "fam", "key", READ_TOKEN, weak, NODE_VALUE)
    env = error_envelope(resp, 400)
    assert env["message"].startswith("Write token not strong enough"), env
    _assert_name_still_free(comet, ctx)


def test_weak_tokens_accepted_when_strength_check_is_off(lenient_server, ctx):
    comet = Comet(lenient_server.host)
    resp = comet.write(ctx, "fam", "key", "r", "w", NODE_VALUE)
    assert_written(resp)
    assert_reads(comet, ctx, "fam", "key", "r", body_text(resp))
    resp2 = comet.write(ctx, "fam", "key", "r", "w", ["changed"])
    assert_written(resp2)
    assert_reads(comet, ctx, "fam", "key", "r", body_text(resp2))
    assert ok_envelope(comet.enumerate(ctx, "r")) == {
        "contextId": ctx,
        "entries": [{"family": "fam", "key": "key", "value": body_text(resp2)}],
    }
    assert ok_envelope(comet.delete(ctx, "fam", "key", "r", "w")) == {"Success": "Scope deleted"}
    assert_absent(comet, ctx, "fam", "key", "r")


# --------------------------------------------------------------------------- Java-style URLs


def test_java_style_unencoded_query_string(server):
    # The Mobius Java client formats query strings without URL-encoding.
    uid = uuid.uuid4().hex[:8]
    ctx = f"urn:mobius:slice/{uid}@exogeni.net"
    family = "hosts_v1.0-pub"
    key = f"node-0_{uid}.local:22/ssh@root"
    read = "R3ad:tok/en@x.y-z_w"
    write = "Wr1te:tok/en@x.y-z_w"
    host = server.base + "/"
    body = '{"val_": "[{\\"hostName\\": \\"n1\\"}]"}'

    url = f"{host}/writeScope?contextID={ctx}&family={family}&Key={key}&readToken={read}&writeToken={write}"
    prepared = requests.Request(
        "POST", url, data=body, headers={**ACCEPT, "Content-Type": "application/json"}
    ).prepare()
    # The characters really travel unencoded.
    assert f"contextID={ctx}&" in prepared.url
    assert f"Key={key}&" in prepared.url
    with requests.Session() as s:
        assert_written(s.send(prepared, timeout=TIMEOUT))

    url = f"{host}/readScope?contextID={ctx}&family={family}&Key={key}&readToken={read}"
    prepared = requests.Request("GET", url, headers=ACCEPT).prepare()
    assert prepared.url.endswith(f"readToken={read}")
    with requests.Session() as s:
        value = ok_envelope(s.send(prepared, timeout=TIMEOUT))
    assert value == {"contextId": ctx, "family": family, "key": key, "value": body}

    # Parameters in another order, through requests.get on the hand-made URL.
    url = f"{host}/readScope?readToken={read}&Key={key}&contextID={ctx}&family={family}"
    value = ok_envelope(requests.get(url, headers=ACCEPT, timeout=TIMEOUT))
    assert value == {"contextId": ctx, "family": family, "key": key, "value": body}

    url = f"{host}/enumerateScope?contextID={ctx}&family={family}&readToken={read}"
    value = ok_envelope(requests.get(url, headers=ACCEPT, timeout=TIMEOUT))
    assert value == {"contextId": ctx, "family": family, "entries": [{"key": key, "value": body}]}

    url = f"{host}/enumerateScope?contextID={ctx}&readToken={read}"
    value = ok_envelope(requests.get(url, headers=ACCEPT, timeout=TIMEOUT))
    assert value == {
        "contextId": ctx,
        "entries": [{"family": family, "key": key, "value": body}],
    }

    # The encoded form names the same entry.
    value = ok_envelope(Comet(host).read(ctx, family, key, read))
    assert value == {"contextId": ctx, "family": family, "key": key, "value": body}

    url = f"{host}/deleteScope?contextID={ctx}&family={family}&Key={key}&readToken={read}&writeToken={write}"
    value = ok_envelope(requests.delete(url, headers=ACCEPT, timeout=TIMEOUT))
    assert value == {"Success": "Scope deleted"}
    assert_absent(Comet(host), ctx, family, key, read)


# --------------------------------------------------------------------------- idle expiry


def test_idle_expiry(expiry_server):
    """E = 2 s: A, read every E for 5E, stays; B, left alone, is gone after 2E + 1 s."""
    comet = Comet(expiry_server.host)
    ctx = "ctx-" + uuid.uuid4().hex
    e = 2.0

    a = comet.write(ctx, "fam", "A", READ_TOKEN, WRITE_TOKEN, ["A"])
    b = comet.write(ctx, "fam", "B", READ_TOKEN, WRITE_TOKEN, ["B"])
    t0 = time.monotonic()
    assert_written(a)
    assert_written(b)

    def sleep_until(offset):
        delay = t0 + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    schedule = sorted(
        [(e * i, "A") for i in range(1, 6)] + [(2 * e + 1, "B")]
    )  # A at 2, 4, 6, 8, 10 s; B at 5 s
    for offset, which in schedule:
        sleep_until(offset)
        if which == "A":
            resp = comet.read(ctx, "fam", "A", READ_TOKEN)
            value = ok_envelope(resp)
            assert value == {
                "contextId": ctx,
                "family": "fam",
                "key": "A",
                "value": body_text(a),
            }, f"A vanished at t={time.monotonic() - t0:.1f}s"
        else:
            assert_absent(comet, ctx, "fam", "B", READ_TOKEN)

    # Only A is left in the context.
    assert ok_envelope(comet.enumerate(ctx, READ_TOKEN)) == {
        "contextId": ctx,
        "entries": [{"family": "fam", "key": "A", "value": body_text(a)}],
    }
    # B's name is free again: a new writer creates it afresh.
    resp = comet.write(ctx, "fam", "B", OTHER_READ_TOKEN, OTHER_WRITE_TOKEN, ["B2"])
    assert_written(resp)
    assert_reads(comet, ctx, "fam", "B", OTHER_READ_TOKEN, body_text(resp))


# --------------------------------------------------------------------------- cross-API


def test_comet_write_visible_through_native_api(server, comet, ctx):
    resp = comet.write(ctx, "nodes", "n1", READ_TOKEN, WRITE_TOKEN, NODE_VALUE)
    assert_written(resp)
    sent = body_text(resp)

    native = requests.get(
        f"{server.base}/v1/kv/{ctx}/nodes/n1",
        headers={"Amphora-Read-Token": READ_TOKEN, "Accept": "application/json"},
        timeout=TIMEOUT,
    )
    assert native.status_code == 200, native.text
    doc = native.json()
    assert isinstance(doc["value"], str), doc
    assert doc["value"] == sent

    # Another read token does not see it there either.
    other = requests.get(
        f"{server.base}/v1/kv/{ctx}/nodes/n1",
        headers={"Amphora-Read-Token": OTHER_READ_TOKEN, "Accept": "application/json"},
        timeout=TIMEOUT,
    )
    assert other.status_code in (403, 404), other.text
    assert "10.0.0.1" not in other.text
