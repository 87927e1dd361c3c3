"""Bad requests and overload: every bad request gets a 4xx with an OpenAI error body and the
server keeps serving; a full queue answers 503 with Retry-After; a client that goes away
frees its row; a deadline ends a request; SIGTERM drains and exits 0."""
import json
import math
import threading

import httpx
import pytest
from serverun import Server

openai = pytest.importorskip("openai")

OK = {"model": "run", "prompt": "def add", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

# (what is wrong, path, body, status, param)
BAD = [
    ("missing model", "completions", {"prompt": "x"}, 400, "model"),
    ("missing prompt", "completions", {"model": "run"}, 400, "prompt"),
    ("missing messages", "chat/completions", {"model": "run"}, 400, "messages"),
    ("empty messages", "chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("message without role", "chat/completions", {**CHAT, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("a string temperature", "completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("a float max_tokens", "completions", {**OK, "max_tokens": 1.5}, 400, "max_tokens"),
    ("a number as prompt", "completions", {**OK, "prompt": 3.5}, 400, "prompt"),
    ("unknown model", "completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("unknown expert", "completions", {**OK, "model": "run:expert-9"}, 404, "model"),
    ("unknown variant", "chat/completions", {**CHAT, "model": "run:best"}, 404, "model"),
    ("gates of the wrong length", "completions", {**OK, "gates": [1, 0]}, 400, "gates"),
    ("negative gates", "completions", {**OK, "gates": [1, -1, 0, 0]}, 400, "gates"),
    ("all-zero gates", "completions", {**OK, "gates": [0, 0, 0, 0]}, 400, "gates"),
    ("gates that are not numbers", "completions", {**OK, "gates": ["a", 0, 0, 0]}, 400, "gates[0]"),
    ("gates with a variant", "completions", {**OK, "model": "run:expert-1", "gates": [1, 0, 0, 0]}, 400, "gates"),
    ("a prompt longer than the context", "completions", {**OK, "prompt": "x " * 200}, 400, "prompt"),
    ("a chat longer than the context", "chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "y " * 200}]}, 400, "messages"),
    ("max_tokens 0", "completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -1", "chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens over the limit", "completions", {**OK, "max_tokens": 10_000}, 400, "max_tokens"),
    ("max_completion_tokens over the context", "chat/completions",
     {**CHAT, "max_completion_tokens": 60}, 400, "max_completion_tokens"),
    ("temperature above 2", "completions", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("negative temperature", "completions", {**OK, "temperature": -0.1}, 400, "temperature"),
    ("top_p 0", "completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("top_p above 1", "chat/completions", {**CHAT, "top_p": 1.5}, 400, "top_p"),
    ("n too large", "completions", {**OK, "n": 3}, 400, "n"),
    ("n 0", "completions", {**OK, "n": 0}, 400, "n"),
    ("five stop strings", "completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("an unknown field", "completions", {**OK, "temprature": 0.5}, 400, "temprature"),
    ("an unsupported feature", "chat/completions", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("token ids outside the vocabulary", "completions", {**OK, "prompt": [1, 99999]}, 400, "prompt"),
    ("a seed out of range", "completions", {**OK, "seed": 2 ** 70}, 400, "seed"),
]


@pytest.fixture(scope="module")
def server(serve_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-errors")
    # a 48-token context and small limits, so that "too long" and "too many" are cheap to ask
    with Server(serve_run, tmp, "--context", "48", "--max_tokens", "40", "--max_n", "2", "--max_batch", "4") as s:
        yield s


def _post(server, path, **kwargs):
    return httpx.post(f"{server.url}/v1/{path}", timeout=60, **kwargs)


def _error(response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    return error


@pytest.mark.parametrize("what,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, what, path, body, status, param):
    response = _post(server, path, json=body)
    assert response.status_code == status, (what, response.text)
    error = _error(response)
    assert error["param"] == param, (what, error)
    assert error["message"].startswith(param.split("[")[0]) or status == 404, error
    assert _post(server, "completions", json=OK).status_code == 200


@pytest.mark.parametrize("content", [b"{not json", b'{"model": "run", "prompt": "x",', b"", b"[1, 2]",
                                     '{"model": "run", "prompt": "\u00e9"}'.encode("latin-1"), b"\xff\xfe\x00"])
def test_bodies_that_are_not_json_objects_get_400(server, content):
    response = _post(server, "completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert _error(response)["param"] in ("body", "model")
    assert _post(server, "completions", json=OK).status_code == 200


def test_nan_gates_and_unknown_paths(server):
    nan = json.dumps({**OK, "gates": [math.nan, 1, 0, 0]})  # Python writes NaN; strict JSON has none
    assert _post(server, "completions", content=nan, headers={"content-type": "application/json"}).status_code == 400
    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    response = httpx.get(server.url + "/v1/completions", timeout=10)
    assert response.status_code == 405 and _error(response)
    assert _post(server, "completions", json=OK).status_code == 200


def test_the_openai_client_sees_the_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="run:expert-7", prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="run", messages=[{"role": "user", "content": "x"}], temperature=9)
    assert client.completions.create(model="run", prompt="x", max_tokens=2).choices[0].finish_reason


@pytest.fixture(scope="module")
def narrow(serve_run, tmp_path_factory):
    """One row, one waiting request: overload is two requests away."""
    tmp = tmp_path_factory.mktemp("serve-narrow")
    with Server(serve_run, tmp, "--max_batch", "1", "--max_queue", "1", "--max_tokens", "400") as s:
        yield s


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def _wait(condition, seconds=60.0):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_full_queue_answers_503_with_retry_after(narrow):
    long = {"model": "run", "prompt": "def add", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=120) as first, first.stream("POST", narrow.url + "/v1/completions", json=long) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)  # it holds the only row
        waiting = threading.Thread(target=lambda: _post(narrow, "completions", json={**long, "stream": False}))
        waiting.start()
        assert _wait(lambda: _metric(narrow, "dylora_queue_depth") == 1)
        refused = _post(narrow, "completions", json=OK)
        depth = _metric(narrow, "dylora_queue_depth")
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert _error(refused)["code"] == "queue_full" and depth == 1
    waiting.join(120)
    assert _post(narrow, "completions", json=OK).status_code == 200


def test_a_client_that_goes_away_frees_its_row(narrow):
    before = _metric(narrow, "dylora_completion_tokens_total")
    long = {"model": "run", "prompt": "def add", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=120) as gone, gone.stream("POST", narrow.url + "/v1/completions", json=long) as r:
        next(r.iter_lines())
    assert _wait(lambda: _metric(narrow, "dylora_running_rows") == 0)
    assert _metric(narrow, "dylora_completion_tokens_total") - before < 400  # it stopped early
    assert _post(narrow, "completions", json=OK).status_code == 200


def test_a_request_past_its_deadline_ends_with_504(narrow):
    response = _post(narrow, "completions", json={**OK, "max_tokens": 400, "timeout": 0.05, "ignore_eos": True})
    assert response.status_code == 504 and _error(response)["code"] == "deadline_exceeded"
    assert _post(narrow, "completions", json=OK).status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(serve_run, tmp_path):
    server = Server(serve_run, tmp_path, "--drain_timeout", "60")
    try:
        body = {"model": "run:expert-1", "prompt": "def add", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.Client(timeout=120) as client, client.stream("POST", server.url + "/v1/completions",
                                                                 json=body) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert server.proc.poll() is None
            server.proc.send_signal(15)
            assert _wait(lambda: _refused(server), 30)  # no new requests
            rest = [line for line in lines if line]
        chunks = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the in-flight request finished
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def _refused(server) -> bool:
    try:
        return httpx.get(server.url + "/health", timeout=2).status_code == 503
    except httpx.HTTPError:
        return True


def test_bad_flags_are_one_line_errors(serve_run, tmp_path, capsys):
    from dylora_moe.cli import main

    for argv, message in ((["serve", str(serve_run), "--max_batch", "0"], "--max_batch 0: expected an integer >= 1"),
                          (["serve", str(serve_run), "--port", "70000"], "--port 70000: expected 1..65535"),
                          (["serve", str(serve_run), "--drain_timeout", "0"], "--drain_timeout 0.0: expected seconds > 0"),
                          (["export", str(serve_run), "--gates", "1,x", "--out", str(tmp_path / "a")],
                           "--gates 1,x: expected comma-separated numbers, e.g. 0.5,0.5,0,0"),
                          (["export", str(serve_run), "--gates", "1,1", "--out", str(tmp_path / "b")],
                           "--gates: expected 4 values (one per expert), got 2"),
                          (["export", str(serve_run), "--source", "nope", "--out", str(tmp_path / "c")],
                           "--source nope: not a data source of this run; expected one of demo:numbers, demo:strings")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"error: {message}", err
