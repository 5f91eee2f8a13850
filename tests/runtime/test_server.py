"""`rwkv2rknn serve` driven by the official `openai` client (and raw HTTP where a client would
not send it), against real server processes on 127.0.0.1 with the bundled model on onnxruntime."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers.robustness import as_from_a_terminal

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds

openai = pytest.importorskip("openai")

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A real `rwkv2rknn serve` process; ``stop()`` ends it (SIGTERM) and returns its stderr."""

    def __init__(self, artifact, *extra, tmp=None):
        self.port = free_port()
        self.err_path = os.path.join(tmp, f"serve-{self.port}.log")
        self._err = open(self.err_path, "w")
        env = dict(os.environ, TQDM_DISABLE="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rwkv2rknn",
                "serve",
                artifact,
                "--backend",
                "ort",
                "--host",
                HOST,
                "--port",
                str(self.port),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            env=env,
            preexec_fn=as_from_a_terminal,
        )
        self.wait_ready()
        self.name = self.get("/v1/models")[1]["data"][0]["id"]
        self.client = openai.OpenAI(
            base_url=f"http://{HOST}:{self.port}/v1", api_key="none", max_retries=0, timeout=120
        )

    def wait_ready(self, limit=90):
        end = time.time() + limit
        while time.time() < end:
            assert self.proc.poll() is None, self.log()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not come up: " + self.log())

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            try:
                return r.status, json.loads(data)
            except ValueError:
                return r.status, data
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, obj):
        return self.request("POST", path, json.dumps(obj), {"Content-Type": "application/json"})

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1])

    def log(self) -> str:
        if not self._err.closed:
            self._err.flush()
        with open(self.err_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log = self.log()
        self._err.close()
        return log


@pytest.fixture(scope="module")
def server(bundled_artifact, tmp_path_factory):
    s = Server(
        bundled_artifact,
        "--max-prompt-tokens",
        "3000",
        "--max-tokens",
        "64",
        tmp=str(tmp_path_factory.mktemp("serve")),
    )
    yield s
    log = s.stop()
    # SIGTERM (a service manager's stop): exit 143 with one line, after everything above
    assert s.proc.returncode == 143 and log.strip().splitlines()[-1] == "terminated", log


def chat(server, messages, **kw):
    kw.setdefault("max_tokens", 30)
    kw.setdefault("temperature", 0)
    return server.client.chat.completions.create(model=server.name, messages=messages, **kw)


def streamed(server, messages, **kw):
    kw.setdefault("max_tokens", 30)
    kw.setdefault("temperature", 0)
    text, finish, usage, roles = [], None, None, []
    for c in server.client.chat.completions.create(model=server.name, messages=messages, stream=True, **kw):
        assert c.object == "chat.completion.chunk"
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                text.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    return "".join(text), finish, usage, roles


HELLO = [{"role": "user", "content": "Hello, how do you do?"}]


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.name]
    status, body = server.get("/health")
    assert status == 200 and body["status"] == "ok"


def test_chat_streamed_equals_unstreamed_at_temperature_0(server):
    r = chat(server, HELLO)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.message.content and c.message.content == c.message.content.lstrip()
    assert c.finish_reason in ("stop", "length")
    from rwkv2rknn.runtime.chatformat import render

    assert r.usage.prompt_tokens == len(render([("user", HELLO[0]["content"])]).encode())
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    text, finish, usage, roles = streamed(server, HELLO, stream_options={"include_usage": True})
    assert text == c.message.content and finish == c.finish_reason and roles == ["assistant"]
    assert usage.completion_tokens == r.usage.completion_tokens


def test_completions_streamed_and_not(server):
    r = server.client.completions.create(
        model=server.name, prompt="It was a truth", max_tokens=20, temperature=0
    )
    assert r.object == "text_completion" and r.usage.prompt_tokens == len("It was a truth")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    parts = [
        c.choices[0].text
        for c in server.client.completions.create(
            model=server.name, prompt="It was a truth", max_tokens=20, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == r.choices[0].text
    ids = server.client.completions.create(
        model=server.name, prompt=list(b"It was a truth"), max_tokens=20, temperature=0
    )
    assert ids.choices[0].text == r.choices[0].text


def test_a_second_turn_starts_from_the_cached_state_and_equals_a_fresh_run(server, bundled_artifact):
    from rwkv2rknn.runtime.chatformat import TURN_END, render, reply_text
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.sampler import Sampler
    from rwkv2rknn.runtime.session import Session
    from rwkv2rknn.runtime.tokenizer import ByteTokenizer

    first = [
        {"role": "system", "content": "You are a character in a novel."},
        {"role": "user", "content": "Who is at the door?"},
    ]
    r1 = chat(server, first)
    turn2 = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "And what does she want?"},
    ]
    r2 = chat(server, turn2)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens + 1  # the first prompt and (some of) the reply
    assert cached < r2.usage.prompt_tokens

    model = HybridModel(bundled_artifact, backend="ort")
    s = Session(model, ByteTokenizer())
    prompt = render([(m["role"], m["content"]) for m in turn2])
    fresh = s.generate(s.encode(prompt), Sampler(temperature=0), 30, stop=[TURN_END])
    model.close()
    assert reply_text(fresh.text) == r2.choices[0].message.content


def test_stop_seed_and_unknown_fields(server):
    free = chat(server, HELLO, max_tokens=40).choices[0].message.content
    assert "e" in free
    r = chat(server, HELLO, max_tokens=40, stop=["e"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == free[: free.find("e")]
    a = chat(server, HELLO, temperature=1.0, seed=11, max_tokens=25).choices[0].message.content
    b = chat(server, HELLO, temperature=1.0, seed=11, max_tokens=25).choices[0].message.content
    assert a == b
    odd = chat(
        server,
        HELLO,
        max_tokens=5,
        extra_body={"no_such_field": [1, 2], "logit_bias": {"1": 2}},
        user="someone",
    )
    assert odd.choices[0].message.content is not None
    s = chat(server, HELLO, max_completion_tokens=3)
    assert s.usage.completion_tokens == 3 and s.choices[0].finish_reason == "length"


def test_error_shapes_and_statuses(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="gpt-nothing", messages=HELLO)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, HELLO, temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        chat(server, [])
    with pytest.raises(openai.BadRequestError):
        chat(server, [{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, [{"role": "user", "content": "x" * 3100}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        chat(server, HELLO, n=2)

    for body, status in (
        (b'{"messages": [', 400),
        (b"[1, 2]", 400),
        (b"\xff\xfe", 400),
        (b"x" * (9 << 20), 413),
    ):
        code, got = server.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert code == status, got
        assert set(got["error"]) == {"message", "type", "param", "code"}
    code, got = server.get("/v1/nothing")
    assert code == 404 and "error" in got
    assert server.get("/health")[0] == 200  # it goes on serving
    assert chat(server, HELLO, max_tokens=3).usage.completion_tokens == 3


def test_eight_concurrent_streams_all_answer_in_arrival_order_and_memory_stays_flat(server):
    want = chat(server, HELLO, max_tokens=24).choices[0].message.content

    def round_of(n):
        out, errors = [None] * n, []

        def one(i):
            try:
                out[i] = streamed(server, HELLO, max_tokens=24)[0]
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and all(t == want for t in out), (errors, out)

    round_of(8)
    before = server.rss_kb()
    for _ in range(3):
        round_of(8)
    assert server.rss_kb() - before < 30_000  # kB: no growth per request


def test_a_client_that_goes_away_stops_its_generation(server):
    conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": server.name, "messages": HELLO, "max_tokens": 60000, "stream": True}),
        {"Content-Type": "application/json"},
    )
    r = conn.getresponse()
    assert r.status == 200
    assert r.read(6) == b"data: "
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.time()
    # 60000 tokens would take minutes: the next request is served at once if the first stopped
    assert chat(server, HELLO, max_tokens=5).usage.completion_tokens == 5
    assert time.time() - t0 < 20


def test_queue_full_is_429_time_limit_cuts_and_the_state_dir_survives_a_restart(bundled_artifact, tmp_path):
    d = str(tmp_path / "states")
    s = Server(
        bundled_artifact, "--max-queue", "1", "--request-timeout", "4", "--state-dir", d, tmp=str(tmp_path)
    )
    try:
        results = []

        def one():
            try:
                # a completion (no chat stop rule): only the time limit ends it
                results.append(
                    s.client.completions.create(model=s.name, prompt="Once upon a time", max_tokens=60000)
                    .choices[0]
                    .finish_reason
                )
            except openai.APIStatusError as e:  # 429 queue_full; 503 timeout if it waited too long
                results.append(e.body["code"])

        def pending_reaches(n, limit=30):
            end = time.time() + limit
            while time.time() < end:
                if s.get("/health")[1]["queue"] >= n:
                    return
                time.sleep(0.02)
            raise AssertionError(f"the server never had {n} request(s) pending")

        threads = [threading.Thread(target=one) for _ in range(5)]
        # one running, then one waiting (each seen by the server before the next is sent), then
        # three that find the queue full: the order the assertion needs, whatever the load
        threads[0].start()
        pending_reaches(1)
        threads[1].start()
        pending_reaches(2)
        for t in threads[2:]:
            t.start()
        for t in threads:
            t.join(timeout=90)
        # one runs (cut by the time limit), one waits, three are refused
        assert "length" in results and results.count("queue_full") == 3, results
        assert set(results) <= {"length", "stop", "queue_full", "timeout"}, results

        end = time.time() + 30  # the worker saves a request's states before it counts it done
        while s.get("/health")[1]["queue"] and time.time() < end:
            time.sleep(0.02)
        for n in os.listdir(d):  # keep only the states of the next request
            os.unlink(os.path.join(d, n))
        r1 = chat(s, [{"role": "user", "content": "Where is Emma?"}], max_tokens=10)
        log = s.stop()
        assert "Traceback" not in log
    finally:
        s.stop()
    files = sorted((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)
    assert len(files) == 2 and all(f.endswith(".state") for f in files)  # after the prompt, after the reply
    for f in files[:-1]:  # damage all but the state with the most tokens (the last reply's)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) - 7)
    s2 = Server(bundled_artifact, "--state-dir", d, "--max-queue", "4", tmp=str(tmp_path))
    try:
        turn2 = [
            {"role": "user", "content": "Where is Emma?"},
            {"role": "assistant", "content": r1.choices[0].message.content},
            {"role": "user", "content": "Why?"},
        ]
        r2 = chat(s2, turn2, max_tokens=5)
        assert r2.usage.prompt_tokens_details.cached_tokens > r1.usage.prompt_tokens
    finally:
        log = s2.stop()
    assert log.count("skipped") == len(files) - 1 and "damaged" in log


def test_503_while_the_model_loads(bundled_artifact):
    import uvicorn
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.server import Engine, ServerConfig, make_app
    from rwkv2rknn.runtime.tokenizer import ByteTokenizer

    gate = threading.Event()

    def load():
        gate.wait(60)
        return HybridModel(bundled_artifact, backend="ort"), ByteTokenizer()

    engine = Engine(ServerConfig(artifact=bundled_artifact, state_cache_bytes=0), load=load)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(engine), host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    engine.start()
    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="none", max_retries=0)
    try:
        while not srv.started:
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=engine.name, messages=HELLO, max_tokens=3)
        assert e.value.status_code == 503 and e.value.body["code"] == "loading"
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        conn.close()
        gate.set()
        end = time.time() + 30
        while engine.status == "loading" and time.time() < end:
            time.sleep(0.05)
        r = client.chat.completions.create(model=engine.name, messages=HELLO, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3 and r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        gate.set()
        srv.should_exit = True
        thread.join(timeout=30)


def test_serve_and_chat_import_nothing_heavy(fp32_plan_artifact):
    """What `serve` and `chat` import on the board: no torch, onnx, onnx-graphsurgeon, rknn
    (nor pydantic: the stack is Starlette and uvicorn only)."""
    code = (
        "import sys; from rwkv2rknn.cli import cli; "
        "from rwkv2rknn.runtime.server import Engine, ServerConfig, make_app; "
        "from rwkv2rknn.runtime.loader import open_model; "
        "from rwkv2rknn.runtime.session import Session; from rwkv2rknn.runtime.sampler import Sampler; "
        "from rwkv2rknn.runtime.tokenizer import ByteTokenizer; "
        f"m, _ = open_model({fp32_plan_artifact!r}, 'ort'); s = Session(m, ByteTokenizer()); "
        "r = s.generate([1, 2, 3], Sampler(temperature=0), 5, stop_ids=()); assert len(r.ids) == 5; "
        f"make_app(Engine(ServerConfig(artifact={fp32_plan_artifact!r}))); "
        "bad = [k for k in ('torch', 'onnx', 'onnx_graphsurgeon', 'rknn', 'rwkv2rknn.rknn.toolkit', "
        "'pydantic') if k in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ctrl_c_ends_the_server_with_130(bundled_artifact, tmp_path):
    """Ctrl-C: exit 130 and one line (SIGTERM's 143 is checked when the module's server stops)."""
    srv = Server(bundled_artifact, tmp=str(tmp_path))
    assert srv.client.completions.create(model=srv.name, prompt="Hi", max_tokens=2, temperature=0)
    log = srv.stop(signal.SIGINT)
    assert srv.proc.returncode == 130, log
    assert log.strip().splitlines()[-1] == "interrupted" and "Traceback" not in log, log


def test_a_port_in_use_or_a_missing_artifact_is_one_line(server, bundled_artifact, tmp_path):
    for args, text in (
        ([bundled_artifact, "--port", str(server.port)], "cannot listen on"),
        ([str(tmp_path / "missing")], "is not a folder"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "rwkv2rknn", "serve", *args, "--backend", "ort", "--host", HOST],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode in (1, 2) and text in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
