"""RemoteReward against a real HTTP server on 127.0.0.1, started per test with handlers written for that test."""

import base64
import io
import json
import logging
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

import pytest
from helpers import loopback_server
from PIL import Image

from trl_guard.rewards import resolve_reward_func
from trl_guard.rewards.remote import RemoteReward, RemoteRewardError

TOKEN = "sk-test-0123456789abcdef"
FAST = {"backoff": 0.01}  # retries in tests wait 10, 20, 40 ms


@dataclass
class Received:
    path: str
    headers: dict
    raw: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.raw)

    @property
    def images(self) -> list[Image.Image]:
        return [Image.open(io.BytesIO(base64.b64decode(data))) for data in self.json["images"]]


@dataclass
class Server:
    """What the handler saw, and `respond(request, number)` -> (status, body: bytes | JSON value[, headers])."""

    url: str = ""
    requests: list = field(default_factory=list)
    respond: object = None
    # Set at teardown so that handlers still sleeping (timeout tests) return at once.
    stop: threading.Event = field(default_factory=threading.Event)


pytestmark = pytest.mark.usefixtures("no_proxy")  # requests go to the tests' loopback servers


@pytest.fixture
def server():
    state = Server()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received = Received(self.path, dict(self.headers), self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state.requests.append(received)
                number = len(state.requests)
            status, body, *extra = state.respond(received, number)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                for key, value in (extra[0] if extra else {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def log_message(self, *args):
            pass

    with loopback_server(Handler) as url:
        state.url = f"{url}/score"
        yield state
        state.stop.set()


def images(n, size=(64, 48)):
    return [Image.new("RGB", size, (i * 40 % 256, 0, 0)) for i in range(n)]


def red_score(received, number):
    """Score = red channel / 255 of each image: checks images arrive intact and scores come back in order."""
    return 200, {"scores": [image.convert("RGB").getpixel((0, 0))[0] / 255 for image in received.images]}


def full_error_text(excinfo) -> str:
    return "".join(traceback.format_exception(excinfo.value))


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_scores_come_back_in_order_in_batches(server, image_format):
    server.respond = red_score
    reward = RemoteReward(server.url, batch_size=2, image_format=image_format)
    scores = reward([f"prompt {i}" for i in range(5)], images(5))

    assert len(server.requests) == 3
    assert [len(r.json["prompts"]) for r in server.requests] == [2, 2, 1]
    assert [p for r in server.requests for p in r.json["prompts"]] == [f"prompt {i}" for i in range(5)]
    decoded = [image for r in server.requests for image in r.images]
    assert all(image.format == image_format and image.size == (64, 48) for image in decoded)
    assert scores == pytest.approx([i * 40 / 255 for i in range(5)], abs=2 / 255)  # JPEG may shift a level
    assert server.requests[0].headers["Content-Type"] == "application/json"


def test_metadata_holds_json_columns_sliced_per_batch(server):
    server.respond = lambda received, number: (200, {"scores": [0.5] * len(received.json["images"])})
    reward = RemoteReward(server.url, batch_size=2)
    reward(
        prompts=["a", "b", "c"],
        images=images(3),
        tag=["color", "count", "position"],
        include=[[{"class": "cat", "count": 1}], [], [{"class": "dog", "count": 2}]],
        trainer_state=object(),
        objects=[object()] * 3,  # not JSON: skipped
        with_nan=[1.0, float("nan"), 2.0],  # not strict JSON: skipped
        other_length=[1, 2],
        scalar=3,
    )
    assert [r.json["metadata"] for r in server.requests] == [
        {"tag": ["color", "count"], "include": [[{"class": "cat", "count": 1}], []]},
        {"tag": ["position"], "include": [[{"class": "dog", "count": 2}]]},
    ]


def test_no_columns_give_empty_metadata_and_none_scores_pass_through(server):
    server.respond = lambda received, number: (200, {"scores": [None, 1], "debug": "ignored"})
    assert RemoteReward(server.url)(["a", "b"], images(2)) == [None, 1.0]
    assert server.requests[0].json["metadata"] == {}


def test_empty_batch_sends_nothing(server):
    assert RemoteReward(server.url)([], []) == []
    assert server.requests == []


@pytest.mark.parametrize("status", [503, 429, 500])
def test_retries_then_succeeds(server, status, caplog):
    server.respond = lambda received, number: (status, {"error": "busy"}) if number <= 2 else red_score(received, 1)
    reward = RemoteReward(server.url, max_retries=3, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="trl_guard.rewards.remote"):
        assert reward(["a"], images(1)) == [0.0]
    assert len(server.requests) == 3
    assert caplog.text.count("retrying") == 2 and f"HTTP {status}" in caplog.text


def test_server_errors_exhaust_retries(server):
    server.respond = lambda received, number: (503, b"overloaded")
    reward = RemoteReward(server.url, max_retries=2, **FAST)
    with pytest.raises(RemoteRewardError) as excinfo:
        reward(["a"], images(1))
    assert len(server.requests) == 3
    message = str(excinfo.value)
    assert server.url in message and "3 attempts" in message and "HTTP 503" in message and "overloaded" in message
    assert (excinfo.value.attempts, excinfo.value.status) == (3, 503)


def test_timeout_is_retried_then_named(server):
    def slow(received, number):
        server.stop.wait(2.0)
        return red_score(received, number)

    server.respond = slow
    reward = RemoteReward(server.url, timeout=0.2, max_retries=1, **FAST)
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as excinfo:
        reward(["a"], images(1))
    assert time.perf_counter() - start < 1.5
    assert len(server.requests) == 2
    message = str(excinfo.value)
    assert server.url in message and "2 attempts" in message and "0.2 s timeout" in message


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_errors_are_not_retried(server, status):
    server.respond = lambda received, number: (status, {"detail": "images[0] is not a PNG"})
    reward = RemoteReward(server.url, max_retries=3, **FAST)
    with pytest.raises(RemoteRewardError) as excinfo:
        reward(["a"], images(1))
    assert len(server.requests) == 1
    message = str(excinfo.value)
    assert server.url in message and f"HTTP {status}" in message and "is not a PNG" in message
    assert "Not retried" in message and excinfo.value.status == status


def test_redirects_are_not_followed(server):
    server.respond = lambda received, number: (302, b"", {"Location": "http://127.0.0.1:1/elsewhere"})
    with pytest.raises(RemoteRewardError, match="Redirects are not followed"):
        RemoteReward(server.url, headers={"Authorization": f"Bearer {TOKEN}"}, **FAST)(["a"], images(1))
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"scores": [1.0]}, "returned 1 scores for a batch of 2"),
        ({"scores": [1.0, 2.0, 3.0]}, "returned 3 scores for a batch of 2"),
        (b"<html>Internal proxy page</html>", "not JSON"),
        (b"", "not JSON"),
        ({"score": [1.0, 2.0]}, 'no "scores" key'),
        ([1.0, 2.0], 'no "scores" key'),
        ({"scores": 1.0}, "returned a float"),
        ({"scores": [1.0, "high"]}, "score 1 of the batch (image 1) is 'high'"),
        ({"scores": [True, 1.0]}, "score 0 of the batch (image 0) is True"),
        (b'{"scores": [1.0, NaN]}', "is nan"),
    ],
)
def test_bad_responses_fail_loudly_with_the_body(server, body, problem):
    server.respond = lambda received, number: (200, body)
    with pytest.raises(ValueError) as excinfo:
        RemoteReward(server.url, **FAST)(["a", "b"], images(2))
    message = str(excinfo.value)
    assert problem in message and server.url in message and "Response body:" in message
    shown = body.decode() if isinstance(body, bytes) else json.dumps(body)
    assert repr(shown) in message
    assert len(server.requests) == 1


def test_long_bodies_are_truncated(server):
    server.respond = lambda received, number: (200, b"x" * 10_000)
    with pytest.raises(ValueError) as excinfo:
        RemoteReward(server.url)(["a"], images(1))
    assert "9500 more characters" in str(excinfo.value) and len(str(excinfo.value)) < 1_000


def test_closed_port_is_a_connection_error_naming_the_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(ConnectionError) as excinfo:
        RemoteReward(url, max_retries=2, **FAST)(["a"], images(1))
    message = str(excinfo.value)
    assert url in message and "3 attempts" in message and "refused" in message.lower()
    assert excinfo.value.status is None


def test_secrets_never_reach_messages_or_logs(server, caplog):
    # A careless server that echoes the credentials it received, in errors and in a non-JSON 200.
    def echo(received, number):
        status = {1: 500, 2: 500, 3: 200}.get(number, 400)
        return status, f"got {received.headers} at {received.path}".encode()

    server.respond = echo
    url = server.url.replace("127.0.0.1", "alice:hunter2-password@127.0.0.1") + "?key=query-secret-12345"
    reward = RemoteReward(url, headers={"Authorization": f"Bearer {TOKEN}", "X-Api-Key": "plain-key"}, **FAST)
    texts = [repr(reward), reward.url]
    with caplog.at_level(logging.DEBUG, logger="trl_guard.rewards.remote"):
        with pytest.raises(ValueError) as bad_json:  # 500, 500, then a 200 that is not JSON
            reward(["a"], images(1))
        with pytest.raises(RemoteRewardError) as client_error:  # 400
            reward(["a"], images(1))
    texts += [full_error_text(bad_json), full_error_text(client_error), caplog.text]
    assert TOKEN in server.requests[0].headers["Authorization"]  # the server did get it
    assert server.requests[0].headers["X-Api-Key"] == "plain-key"
    assert server.requests[0].path.endswith("?key=query-secret-12345")
    for text in texts:
        for secret in (TOKEN, "plain-key", "hunter2-password", "query-secret-12345"):
            assert secret not in text
    assert "***" in str(client_error.value) and "127.0.0.1" in str(client_error.value)


def test_userinfo_in_the_url_becomes_basic_auth(server):
    server.respond = red_score
    RemoteReward(server.url.replace("//", "//alice:pa%3Ass@"))(["a"], images(1))
    assert server.requests[0].headers["Authorization"] == "Basic " + base64.b64encode(b"alice:pa:ss").decode()


def test_name_and_resolution_from_a_url():
    assert RemoteReward("http://127.0.0.1:9/score", name="geneval").__name__ == "geneval"
    reward = resolve_reward_func("http://127.0.0.1:9/score")
    assert isinstance(reward, RemoteReward) and reward.__name__ == "remote"


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("ftp://example.org/score", {}),
        ("http:///score", {}),
        ("http://127.0.0.1:9", {"batch_size": 0}),
        ("http://127.0.0.1:9", {"timeout": 0}),
        ("http://127.0.0.1:9", {"max_retries": -1}),
        ("http://127.0.0.1:9", {"image_format": "NOPE"}),
    ],
)
def test_bad_arguments_are_rejected(url, kwargs):
    with pytest.raises(ValueError):
        RemoteReward(url, **kwargs)


def test_a_url_trains_from_python_and_from_yaml(server, tiny_pipeline, tiny_pipeline_dir, prompts, tmp_path):
    from helpers import make_trainer

    from trl_guard.cli import main

    server.respond = red_score
    trainer = make_trainer(tiny_pipeline, [server.url], prompts, tmp_path / "python", max_steps=1)
    trainer.train()
    assert [e for e in trainer.state.log_history if "rewards/remote/mean" in e]
    assert len(server.requests) == 2  # one request per micro-batch of 8 images (batch_size 16)

    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt {i}" for i in range(4)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_pipeline_dir}\n"
        'model_init_kwargs: {"text_encoder_3": null, "tokenizer_3": null}\n'
        f"dataset_name: {tmp_path / 'prompts.txt'}\nreward_funcs: ['{server.url}']\n"
        f"output_dir: {tmp_path / 'yaml'}\nuse_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\n"
        "num_generations: 4\nper_device_train_batch_size: 8\nmax_steps: 1\nheight: 32\nwidth: 32\n"
        "num_inference_steps: 3\nmax_sequence_length: 16\nguidance_scale: 1.0\nreport_to: none\nsave_strategy: 'no'\n"
    )
    main(["grpo", "--config", str(recipe)])
    assert len(server.requests) == 3
    assert (tmp_path / "yaml" / "pytorch_lora_weights.safetensors").exists()
