"""VLMJudge against a scripted OpenAI-compatible chat server on 127.0.0.1 (exact values, every error case), and end to
end against `transformers serve` running a tiny LLaVA."""

import base64
import io
import json
import logging
import math
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

import pytest
from helpers import loopback_server
from PIL import Image

from trl_guard.rewards import VLMJudge, group_reward, resolve_reward_func
from trl_guard.rewards.remote import RemoteRewardError
from trl_guard.scoring import RewardSet

TOKEN = "sk-judge-0123456789abcdef"
FAST = {"backoff": 0.01, "max_retries": 1}


@dataclass
class Chat:
    headers: dict
    body: dict

    @property
    def question(self) -> str:
        return self.body["messages"][0]["content"][-1]["text"]

    @property
    def images(self) -> list[Image.Image]:
        decoded = []
        for part in self.body["messages"][0]["content"][:-1]:
            prefix, _, data = part["image_url"]["url"].partition(",")
            assert prefix == "data:image/png;base64"
            decoded.append(Image.open(io.BytesIO(base64.b64decode(data))))
        return decoded

    @property
    def image(self) -> Image.Image:
        (image,) = self.images
        return image


@dataclass
class Server:
    """`respond(chat, number)` -> (status, body: bytes | JSON value); `in_flight_max`: most requests at once."""

    url: str = ""
    requests: list = field(default_factory=list)
    respond: object = None
    delay: float = 0.0
    in_flight: int = 0
    in_flight_max: int = 0


pytestmark = pytest.mark.usefixtures("no_proxy")  # requests go to the tests' loopback servers


@pytest.fixture
def server():
    state = Server()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            chat = Chat(dict(self.headers), json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            with lock:
                state.requests.append(chat)
                number = len(state.requests)
                state.in_flight += 1
                state.in_flight_max = max(state.in_flight_max, state.in_flight)
            time.sleep(state.delay)
            with lock:
                state.in_flight -= 1
            status, body = state.respond(chat, number)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with loopback_server(Handler) as url:
        state.url = f"{url}/v1"
        yield state


def answer(content="Yes", top=None):
    """An OpenAI chat completion with one choice; `top` is the first token's [(token, probability), ...]."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if top is not None:
        entries = [{"token": token, "logprob": math.log(p), "bytes": None} for token, p in top]
        choice["logprobs"] = {
            "content": [{"token": top[0][0], "logprob": math.log(top[0][1]), "top_logprobs": entries}]
        }
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "judge", "choices": [choice]}


def images(n):
    return [Image.new("RGB", (24, 16), (i * 30, 0, 0)) for i in range(n)]


def full_error_text(excinfo) -> str:
    return "".join(traceback.format_exception(excinfo.value))


def test_yes_probability_is_p_yes_over_p_yes_and_no_of_the_first_token(server, monkeypatch):
    # P(yes) spread over spellings, from the red level of each image: checks the image, the order and the sum.
    def respond(chat, number):
        red = chat.image.getpixel((0, 0))[0] / 255
        top = [("Yes", 0.5 * red), (" yes", 0.5 * red), ("NO ", 0.25), ("maybe", 0.2)]
        return 200, answer("Yes", [(t, p) for t, p in top if p > 0] + [("no", 0.05)])

    server.respond = respond
    monkeypatch.setenv("JUDGE_KEY", TOKEN)
    judge = VLMJudge(
        server.url,
        "judge",
        question='Is "{prompt}" a {tag}?',
        api_key_env="JUDGE_KEY",
        max_concurrency=3,
    )
    scores = judge([f"p{i}" for i in range(5)], images(5), tag=list("abcde"), trainer_state=object())

    expected = [(i * 30 / 255) / (i * 30 / 255 + 0.3) for i in range(5)]
    assert scores == pytest.approx(expected, abs=1e-9)
    assert sorted(chat.question for chat in server.requests) == [f'Is "p{i}" a {t}?' for i, t in enumerate("abcde")]
    body = server.requests[0].body
    assert body["model"] == "judge" and body["messages"][0]["role"] == "user"
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"], body["temperature"]) == (True, 20, 1, 0.0)
    assert all(chat.headers["Authorization"] == f"Bearer {TOKEN}" for chat in server.requests)
    assert TOKEN not in repr(judge) and TOKEN not in json.dumps(vars(judge), default=str)


def test_neither_yes_nor_no_scores_none_with_a_warning(server, caplog):
    server.respond = lambda chat, number: (200, answer("Perhaps", [("Perhaps", 0.9), ("Maybe", 0.1)]))
    with caplog.at_level(logging.WARNING, logger="trl_guard.rewards.judge"):
        assert VLMJudge(server.url, "judge")(["a"], images(1)) == [None]
    assert "'Perhaps'" in caplog.text and "top_logprobs" in caplog.text


def test_no_logprobs_under_yes_probability_is_an_error_naming_the_url_and_the_mode(server):
    server.respond = lambda chat, number: (200, answer("Yes"))  # what transformers serve answers
    with pytest.raises(ValueError) as excinfo:
        VLMJudge(server.url, "judge", **FAST)(["a"], images(1))
    message = str(excinfo.value)
    assert f"{server.url}/chat/completions" in message and "scoring='yes_probability'" in message
    assert "no top_logprobs" in message and "scoring='score'" in message
    assert len(server.requests) == 1  # a protocol error, not retried


@pytest.mark.parametrize("choices", [[], [1, 2]])
def test_a_wrong_number_of_choices_is_an_error_naming_the_url(server, choices):
    def respond(chat, number):
        body = answer("Final Score: 3")
        body["choices"] = [body["choices"][0] for _ in choices]
        return 200, body

    server.respond = respond
    with pytest.raises(ValueError) as excinfo:
        VLMJudge(server.url, "judge", scoring="score")(["a"], images(1))
    assert f"{server.url}/chat/completions" in str(excinfo.value)
    assert f"{len(choices)} choices for one request" in str(excinfo.value)


def test_401_is_not_retried_and_the_key_is_redacted_everywhere(server, monkeypatch, caplog):
    # A careless server that echoes the credentials it was sent.
    server.respond = lambda chat, number: (401, f"bad key: {chat.headers['Authorization']}".encode())
    monkeypatch.setenv("JUDGE_KEY", TOKEN)
    judge = VLMJudge(server.url, "judge", api_key_env="JUDGE_KEY", max_retries=3, backoff=0.01)
    with caplog.at_level(logging.DEBUG, logger="trl_guard"):
        with pytest.raises(RemoteRewardError) as excinfo:
            judge(["a", "b"], images(2))
    message = full_error_text(excinfo)
    assert f"{server.url}/chat/completions" in message and "HTTP 401" in message and "Not retried" in message
    assert "bad key: ***" in message
    assert TOKEN not in message and TOKEN not in caplog.text and TOKEN not in repr(judge)
    assert len(server.requests) <= 2  # one per image at most: nothing retried


def test_a_judge_that_is_down_fails_before_training_and_on_a_call():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = VLMJudge(url, "judge", **FAST)
    with pytest.raises(RemoteRewardError) as excinfo:  # what the trainer builds before it loads the pipeline
        RewardSet([judge])
    assert f"{url}/chat/completions" in str(excinfo.value) and "unreachable" in str(excinfo.value)
    with pytest.raises(ConnectionError) as excinfo:
        judge(["a"], images(1))
    assert f"{url}/chat/completions" in str(excinfo.value) and "2 attempts" in str(excinfo.value)


def test_requests_run_concurrently_up_to_max_concurrency_in_order(server):
    server.delay = 0.15
    server.respond = lambda chat, number: (200, answer(f"Final Score: {chat.question[-1]}"))
    judge = VLMJudge(server.url, "judge", scoring="score", question="{prompt} {digit}", max_concurrency=3)
    digits = ["3", "1", "4", "1", "5", "9", "2"]
    start = time.perf_counter()
    scores = judge(["x"] * 7, images(7), digit=digits)
    elapsed = time.perf_counter() - start
    assert scores == [float(d) for d in digits]
    assert server.in_flight_max == 3
    assert elapsed < 7 * 0.15  # three waves of at most 3, not seven requests one after another


def test_score_answers_that_hold_no_score_on_the_scale_are_none_with_the_answer_quoted(server, caplog):
    answers = iter(["Final Score: 4.5", "I cannot judge this image.", "Score: 42", "**Score:** 2 out of 5"])
    server.respond = lambda chat, number: (200, answer(next(answers)))
    judge = VLMJudge(server.url, "judge", scoring="score", score_range=(1, 5), max_concurrency=1)
    with caplog.at_level(logging.WARNING, logger="trl_guard.rewards.judge"):
        assert judge(["a"] * 4, images(4)) == [4.5, None, None, 2.0]
    assert "'I cannot judge this image.'" in caplog.text and "'Score: 42'" in caplog.text
    assert "from 1 to 5" in server.requests[0].question  # the default question states the scale


def test_a_question_placeholder_without_a_column_is_refused_before_any_request(server):
    from datasets import Dataset

    judge = VLMJudge(server.url, "judge", question="Does it read {text}?")
    with pytest.raises(ValueError, match=r"placeholder\(s\) \{text\}.*train_dataset has no such column"):
        RewardSet([judge]).check_columns({"train_dataset": Dataset.from_dict({"prompt": ["a"], "tag": ["x"]})})
    with pytest.raises(ValueError, match=r"\{text\}"):
        judge(["a"], images(1), tag=["x"])
    assert server.requests == []


def test_arguments_come_by_name_as_a_recipe_gives_them(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    judge = resolve_reward_func("vlm_judge", {"base_url": "http://127.0.0.1:9/v1/", "model": "m", "name": "ocr"})
    assert isinstance(judge, VLMJudge) and judge.url == "http://127.0.0.1:9/v1/chat/completions"
    assert judge.__name__ == "ocr"
    with pytest.raises(ValueError, match="'vlm_judge': missing a required argument: 'model'"):
        resolve_reward_func("vlm_judge", {"base_url": "http://127.0.0.1:9/v1"})
    with pytest.raises(ValueError, match="NO_SUCH_JUDGE_KEY.*not set"):
        resolve_reward_func(
            "vlm_judge", {"base_url": "http://x:1/v1", "model": "m", "api_key_env": "NO_SUCH_JUDGE_KEY"}
        )
    with pytest.raises(ValueError, match="scoring='logits' is unknown"):
        VLMJudge("http://127.0.0.1:9/v1", "m", scoring="logits")
    with pytest.raises(ValueError, match="takes no arguments here"):
        resolve_reward_func("trl_guard.rewards.jpeg_compressibility", {"quality": 3})


def test_a_recipe_gives_the_judge_its_arguments_and_is_refused_before_loading(tmp_path, monkeypatch):
    from trl_guard.scripts.grpo import parse_arguments

    (tmp_path / "p.txt").write_text("a cat\n")
    recipe = tmp_path / "recipe.yaml"
    judge = "{base_url: 'http://127.0.0.1:9/v1', model: judge, api_key_env: JUDGE_KEY, question: 'Is it {prompt}?'}"
    recipe.write_text(
        f"model_name_or_path: some/model\ndataset_name: {tmp_path / 'p.txt'}\noutput_dir: {tmp_path / 'out'}\n"
        f"reward_funcs: [jpeg_compressibility, vlm_judge]\nreward_kwargs: [{{}}, {judge}]\n"
    )
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match=r"reward_funcs\[1\]: VLMJudge: api_key_env='JUDGE_KEY' names an environment"):
        parse_arguments(["--config", str(recipe)])
    monkeypatch.setenv("JUDGE_KEY", TOKEN)
    script_args, _, _ = parse_arguments(["--config", str(recipe)])
    assert script_args.reward_kwargs[1]["question"] == "Is it {prompt}?"
    # a flag gives the list as JSON, and the count must match reward_funcs
    flag = json.dumps([{"base_url": "http://127.0.0.1:9/v1", "model": "judge"}])
    with pytest.raises(ValueError, match=r"reward_kwargs has 1 entries for 2 entries of reward_funcs"):
        parse_arguments(["--config", str(recipe), "--reward_kwargs", flag])
    script_args, _, _ = parse_arguments(
        ["--config", str(recipe), "--reward_funcs", "vlm_judge", "--reward_kwargs", flag]
    )
    assert script_args.reward_kwargs == [{"base_url": "http://127.0.0.1:9/v1", "model": "judge"}]


# ---- group-wise rewards: the pairwise win rate, and how the trainer calls a group reward --------------------------


def red(image) -> float:
    return image.convert("RGB").getpixel((0, 0))[0]


def test_win_rate_is_each_images_share_of_soft_wins_in_n_choose_2_requests(server):
    # The judge prefers the redder image with P = red_first / (red_first + red_second).
    def respond(chat, number):
        first, second = (red(image) for image in chat.images)
        p_first = first / (first + second)
        return 200, answer("1", [("1", p_first), (" 2", 1 - p_first), ("Image", 1e-3)])

    server.respond = respond
    reward = resolve_reward_func("win_rate", {"base_url": server.url, "model": "judge", "max_concurrency": 4})
    reds = [10, 20, 30, 40, 50]
    group = [Image.new("RGB", (8, 8), (r, 0, 0)) for r in reds]
    scores = reward(["a fox"] * 5, group, tag=["t"] * 5)

    expected = [sum(a / (a + b) for b in reds if b != a) / 4 for a in reds]
    assert scores == pytest.approx(expected, abs=1e-9)
    assert len(server.requests) == 10  # n (n - 1) / 2
    shown = [tuple(red(image) for image in chat.images) for chat in server.requests]
    assert len({frozenset(pair) for pair in shown}) == 10
    assert sum(first < second for first, second in shown) in (4, 5, 6)  # the order shown alternates
    assert all('"a fox"' in chat.question and chat.body["max_tokens"] == 1 for chat in server.requests)
    assert reward.scores_groups and reward(["a"], group[:1]) == [None]


def test_win_rate_from_answers_counts_hard_wins_and_leaves_out_unclear_ones(server, caplog):
    def respond(chat, number):
        first, second = (red(image) for image in chat.images)
        if {first, second} == {10, 30}:
            return 200, answer("They are equally good; 0 preference.")
        return 200, answer("Image 1 is better." if first > second else "The second one: 2")

    server.respond = respond
    reward = resolve_reward_func("win_rate", {"base_url": server.url, "model": "judge", "scoring": "score"})
    group = [Image.new("RGB", (8, 8), (r, 0, 0)) for r in (10, 20, 30)]
    with caplog.at_level(logging.WARNING, logger="trl_guard.rewards.judge"):
        assert reward(["a"] * 3, group) == [0.0, 0.5, 1.0]  # 10 lost to 20; 20 beat 10, lost to 30; 30 beat 20
    assert "equally good" in caplog.text


def recording_group_reward(calls):
    @group_reward
    def bluest(prompts, images, **kwargs):
        calls.append(("group", list(prompts), len(images)))
        blue = [image.convert("RGB").getpixel((0, 0))[2] for image in images]
        return [float(sum(b < own for b in blue)) for own in blue]

    def per_sample(prompts, images, **kwargs):
        calls.append(("sample", list(prompts), len(images)))
        return [0.0] * len(images)

    return bluest, per_sample


def test_the_trainer_calls_a_group_reward_once_per_group_after_the_round(tiny_pipeline, prompts, tmp_path):
    from helpers import logged, make_trainer

    calls = []
    bluest, per_sample = recording_group_reward(calls)
    trainer = make_trainer(tiny_pipeline, [per_sample, bluest], prompts, tmp_path, max_steps=1)
    trainer.train()

    kinds = [kind for kind, _, _ in calls]
    assert kinds == ["sample", "sample", "group", "group", "group", "group"]  # 2 micro-batches of 8, then 4 groups
    groups = [(group_prompts, size) for kind, group_prompts, size in calls if kind == "group"]
    assert all(size == 4 and len(set(group_prompts)) == 1 for group_prompts, size in groups)
    # each group's ranks 0..3 (ties aside) average 1.5: the group reward's values reached the advantages
    assert logged(trainer, "rewards/bluest/mean")[0] <= 1.5
    assert logged(trainer, "advantages/bluest/abs_mean")[0] > 0


def test_a_recipe_trains_with_the_judge_and_no_saved_file_holds_the_key(
    server, tiny_pipeline_dir, tmp_path, monkeypatch
):
    from trl_guard.scripts.grpo import main

    server.respond = lambda chat, number: (200, answer("Yes", [("Yes", 0.75), ("No", 0.25)]))
    monkeypatch.setenv("JUDGE_KEY", TOKEN)
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt {i}" for i in range(4)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_pipeline_dir}\n"
        'model_init_kwargs: {"text_encoder_3": null, "tokenizer_3": null}\n'
        f"dataset_name: {tmp_path / 'prompts.txt'}\nreward_funcs: [vlm_judge, jpeg_compressibility]\n"
        f"reward_kwargs: [{{base_url: '{server.url}', model: judge, api_key_env: JUDGE_KEY, name: judge}}, {{}}]\n"
        f"output_dir: {tmp_path / 'out'}\nuse_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\n"
        "num_generations: 4\nper_device_train_batch_size: 8\nmax_steps: 1\nheight: 32\nwidth: 32\n"
        "num_inference_steps: 3\nmax_sequence_length: 16\nguidance_scale: 1.0\nreport_to: none\nsave_strategy: steps\n"
        "save_steps: 1\nmulti_reward_normalization: decoupled\n"
    )
    trainer = main(["--config", str(recipe)])
    assert len(server.requests) == 8 and all(c.headers["Authorization"] == f"Bearer {TOKEN}" for c in server.requests)
    assert [entry["rewards/judge/mean"] for entry in trainer.state.log_history if "rewards/judge/mean" in entry] == [
        pytest.approx(0.75)
    ]
    trainer.create_model_card()  # what push_to_hub uploads
    assert "`judge`" in (tmp_path / "out" / "README.md").read_text()
    saved = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert any("checkpoint-1" in str(path) for path in saved)
    for path in saved:
        assert TOKEN.encode() not in path.read_bytes(), path


GROUP_REWARD = """
import json
import os

import numpy as np

from trl_guard.rewards import group_reward


@group_reward
def blue_rank(prompts, images, **kwargs):
    blue = [round(float(np.asarray(image, dtype=np.float32)[..., 2].mean()), 3) for image in images]
    with open(f"group_calls.{os.environ.get('RANK', '0')}", "a") as f:
        f.write(json.dumps({"prompts": list(prompts), "blue": blue}) + "\\n")
    return [float(sum(b < own for b in blue)) for own in blue]
"""


@pytest.mark.slow
def test_a_group_reward_sees_whole_groups_once_on_two_processes_as_on_one(launch_recipe, tmp_path):
    """Groups of 4 over two processes of 6 images each: the middle group of each round is sampled half on each
    process, and is scored on the second (group g on process g % 2), with its images gathered from both."""
    import sys
    from pathlib import Path

    from helpers import launch, one_process

    (tmp_path / "tests_group.py").write_text(GROUP_REWARD)
    common = ["--config", str(launch_recipe), "--reward_funcs", "tests_rewards.blueness", "tests_group.blue_rank"]
    one_process([*common, "--output_dir", "one", "--per_device_train_batch_size", "12"], tmp_path)
    calls_one = [json.loads(line) for line in (tmp_path / "group_calls.0").read_text().splitlines()]
    (tmp_path / "group_calls.0").rename(tmp_path / "one_calls")
    config = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml"
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "-m",
            "trl_guard.scripts.grpo",
            *common,
            "--output_dir",
            "two",
            "--per_device_train_batch_size",
            "6",
        ],
        tmp_path,
    )
    calls_two = {
        rank: [json.loads(line) for line in (tmp_path / f"group_calls.{rank}").read_text().splitlines()]
        for rank in (0, 1)
    }

    assert len(calls_one) == 9  # 3 rounds x 3 groups, each called once
    assert (len(calls_two[0]), len(calls_two[1])) == (6, 3)  # groups 0 and 2 of each round on rank 0, group 1 on 1
    for call in calls_one + calls_two[0] + calls_two[1]:
        assert len(call["prompts"]) == 4 and len(set(call["prompts"])) == 1
    # the same groups of the same images (to float noise: the weights differ in the last bits after the first step)
    key = lambda call: (call["prompts"][0], call["blue"])  # noqa: E731
    two, one = sorted(map(key, calls_two[0] + calls_two[1])), sorted(map(key, calls_one))
    assert [prompt for prompt, _ in two] == [prompt for prompt, _ in one]
    assert [blue for _, blue in two] == [pytest.approx(blue, abs=0.01) for _, blue in one]

    def logged(run):
        state = json.loads((tmp_path / run / "checkpoint-3" / "trainer_state.json").read_text())
        return [entry["rewards/blue_rank/mean"] for entry in state["log_history"] if "rewards/blue_rank/mean" in entry]

    assert len(logged("one")) == 3 and logged("two") == pytest.approx(logged("one"))


# ---- end to end against a real OpenAI-compatible server: `transformers serve` with a tiny LLaVA --------------------


@dataclass
class Served:
    url: str
    model: str
    log: object


@pytest.fixture(scope="module")
def served_llava(tmp_path_factory):
    """`transformers serve` on a free 127.0.0.1 port, serving `build_tiny_llava`'s model (which answers a prompt
    ending in a digit with that digit); stopped, with every process it started, at the end of the module."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from trl_guard.testing.vlm import build_tiny_llava

    folder = tmp_path_factory.mktemp("served")
    model = build_tiny_llava(str(folder / "tiny-llava"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = folder / "serve.log"
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    command = [str(Path(sys.executable).parent / "transformers"), "serve", model, "--host", "127.0.0.1"]
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--device", "cpu"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: the finalizer stops the server and its workers
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve was not ready within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Served(f"http://127.0.0.1:{port}/v1", model, log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


@pytest.fixture
def recording_proxy(served_llava):
    """A loopback proxy in front of the served model that records the headers and the most requests in flight."""
    import urllib.request

    state = Server()
    lock = threading.Lock()
    target = served_llava.url.removesuffix("/v1")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                state.requests.append(Chat(dict(self.headers), json.loads(raw)))
                state.in_flight += 1
                state.in_flight_max = max(state.in_flight_max, state.in_flight)
            try:
                forward = urllib.request.Request(
                    target + self.path, data=raw, headers={"Content-Type": "application/json"}, method="POST"
                )
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(forward, timeout=60) as response:
                        status, body = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, body = error.code, error.read()
            finally:
                with lock:
                    state.in_flight -= 1
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with loopback_server(Handler) as url:
        state.url = f"{url}/v1"
        yield state


def test_the_judge_scores_each_image_through_transformers_serve(served_llava, recording_proxy, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", TOKEN)
    judge = VLMJudge(
        recording_proxy.url,
        served_llava.model,
        scoring="score",
        question="Rate this image of {prompt}. Score: {digit}",  # the tiny model answers with the last digit
        api_key_env="JUDGE_KEY",
        max_concurrency=3,
        timeout=60,
        max_tokens=1,
    )
    digits = list("31415926")
    scores = judge(["a fox"] * 8, [Image.new("RGB", (40, 30), (30 * i, 90, 0)) for i in range(8)], digit=digits)

    assert scores == [float(digit) for digit in digits]  # one value per image, in order
    assert len(recording_proxy.requests) == 8 and 2 <= recording_proxy.in_flight_max <= 3
    assert all(chat.headers["Authorization"] == f"Bearer {TOKEN}" for chat in recording_proxy.requests)
    assert all(chat.image.size == (40, 30) for chat in recording_proxy.requests)


def test_yes_probability_against_a_server_without_logprobs_names_the_url_and_the_mode(served_llava):
    judge = VLMJudge(served_llava.url, served_llava.model, timeout=60, max_retries=0)
    with pytest.raises(ValueError) as excinfo:
        judge(["a fox"], [Image.new("RGB", (32, 32), "red")])
    message = str(excinfo.value)
    assert f"{served_llava.url}/chat/completions" in message and "scoring='yes_probability'" in message
    assert "no top_logprobs" in message
