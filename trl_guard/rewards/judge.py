"""A vision-language model as judge, over the OpenAI-compatible chat API that vLLM, SGLang and `transformers serve`
expose: one chat request per image, the image as a base64 data URL, the question filled from the prompt and the
dataset's columns.

Two ways to turn the answer into a reward:

- ``scoring="yes_probability"`` (VQAScore): the question asks for Yes or No, one token is generated, and the reward is
  ``P(yes) / (P(yes) + P(no))`` over the first token's ``top_logprobs`` (tokens compared ignoring case and surrounding
  spaces, so ``"Yes"``, ``" yes"`` and ``"YES"`` add up). It needs a server that returns logprobs (vLLM and SGLang do).
- ``scoring="score"`` (UnifiedReward): the question asks for a score on a stated scale, and the reward is the number
  in the answer: the one after the last ``score:`` if the answer has one (``"Final Score: 4"``), else the first
  number. An answer with no number in ``score_range`` scores ``None`` (the sample is skipped), with a warning that
  quotes it.

HTTP (retries of connection errors, timeouts, 429 and 5xx; no redirects; redaction of the key in every message) is
`RemoteReward`'s. The API key is read from the environment variable `api_key_env` names and sent as a bearer token;
it is kept out of the reward's repr, of every error and log line, and of anything the trainer saves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import string
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from .remote import RemoteReward

logger = logging.getLogger(__name__)

SCORINGS = ("yes_probability", "score")

#: VQAScore's question.
YES_NO_QUESTION = 'Does this image show "{prompt}"? Please answer yes or no.'
#: The default question of `scoring="score"`; `{low}` and `{high}` are replaced by `score_range` when the judge is built.
SCORE_QUESTION = (
    'How well does this image match the description "{prompt}", and how good is it as an image? Rate it on a scale '
    'from {low:g} to {high:g} and end your answer with "Final Score: <number>".'
)

# A number as judges write it: "4", "4.5", "-1", ".5", "1e-2".
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_AFTER_SCORE = re.compile(rf"score\s*(?:is|[:=])?\s*\**\s*({_NUMBER})", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
# The most top_logprobs OpenAI's API (and vLLM by default) allows: enough for the spellings of "yes" and "no".
_TOP_LOGPROBS = 20
_MAX_ANSWER_CHARS = 300


def parse_score(answer: str) -> float | None:
    """The number a judge's answer gives as its score: the one after the last "score" (`"Final Score: 4.5"`, `"score
    is 3"`), else the first number in the answer; `None` if it has none.

    Example:
        >>> parse_score("The cat is there but blurry. Final Score: 3.5")
        3.5
        >>> parse_score("4 out of 5")
        4.0
        >>> parse_score("I cannot tell.") is None
        True
    """
    matches = _AFTER_SCORE.findall(answer)
    if matches:
        return float(matches[-1])
    match = _ANY_NUMBER.search(answer)
    return float(match.group()) if match else None


class VLMJudge:
    """Scores each image by asking a vision-language model served behind the OpenAI-compatible chat API.

    Args:
        base_url: The API's base URL, as OpenAI clients take it (`http://127.0.0.1:8000/v1`); requests go to
            `{base_url}/chat/completions`.
        model: The served model's name, as the server knows it (`Qwen/Qwen2.5-VL-7B-Instruct`).
        question: The text sent with each image, a `str.format` template filled with `prompt` and the dataset's
            other columns (`{tag}`, `{text}`, ...). Defaults to VQAScore's yes/no question, or to a rating question
            on `score_range` under `scoring="score"`.
        scoring: `"yes_probability"` or `"score"` (see the module docstring).
        api_key_env: The name of the environment variable holding the API key (`OPENAI_API_KEY`), sent as
            `Authorization: Bearer <key>`. The key itself is never an argument, so recipes and saved configs never
            hold it.
        max_concurrency: The most requests in flight at once within a call.
        timeout: Seconds to wait on each socket operation of a request.
        max_retries: How many times a failed request is retried (connection errors, timeouts, HTTP 429 and 5xx).
        backoff: Seconds to wait before the first retry; the wait doubles at each retry.
        score_range: The lowest and highest score the question asks for (`scoring="score"`): a number outside it is
            not a score (`None`, with a warning).
        image_format: The format images are sent in (`"PNG"`, `"JPEG"`, `"WEBP"`).
        name: The name the reward is logged under (`rewards/{name}/mean`); `"vlm_judge"` by default.
        **generation_kwargs: More fields of the chat request (`max_tokens`, `temperature`, `top_logprobs`, vLLM's
            `chat_template_kwargs`, ...), over the defaults: greedy (`temperature=0`), one token with
            `logprobs=true, top_logprobs=20` for `"yes_probability"`, up to 256 tokens for `"score"`.

    Example:
        >>> judge = VLMJudge("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct", name="ocr_judge")
        >>> judge
        VLMJudge('http://127.0.0.1:8000/v1/chat/completions', model='Qwen/Qwen2.5-VL-7B-Instruct', scoring='yes_probability', name='ocr_judge')
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        question: str | None = None,
        scoring: str = "yes_probability",
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        score_range: Sequence[float] = (1.0, 10.0),
        image_format: str = "PNG",
        name: str | None = None,
        **generation_kwargs: Any,
    ):
        if scoring not in SCORINGS:
            raise ValueError(f"VLMJudge: scoring={scoring!r} is unknown; use one of {SCORINGS}.")
        if not isinstance(base_url, str):
            raise ValueError(
                f"VLMJudge: base_url must be a str such as 'http://127.0.0.1:8000/v1', not {type(base_url).__name__}."
            )
        if not isinstance(model, str) or not model:
            raise ValueError("VLMJudge: model must be the served model's name, a non-empty str.")
        if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
            raise ValueError(f"VLMJudge: max_concurrency must be a positive int, got {max_concurrency!r}.")
        low, high = (float(x) for x in score_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"VLMJudge: score_range must be two finite numbers, low < high, got {score_range!r}.")
        if question is None:
            question = (
                YES_NO_QUESTION
                if scoring == "yes_probability"
                else SCORE_QUESTION.format(prompt="{prompt}", low=low, high=high)
            )
        try:
            self._placeholders = {field for _, field, _, _ in string.Formatter().parse(question) if field is not None}
        except ValueError as error:
            raise ValueError(
                f"VLMJudge: question={question!r} is not a valid template ({error}). Placeholders are written "
                "{prompt} or {column}; a literal brace is written {{ or }}."
            ) from None
        if any(not field.isidentifier() for field in self._placeholders):
            raise ValueError(
                f"VLMJudge: question={question!r} has a placeholder that is not a plain name; use {{prompt}} or "
                "{column} with a dataset column's name."
            )
        headers = {}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"VLMJudge: api_key_env={api_key_env!r} names an environment variable that is not set (or empty). "
                    f"Export the judge server's key first (`export {api_key_env}=...`), or leave api_key_env unset "
                    "for a server without a key."
                )
            headers["Authorization"] = f"Bearer {key}"
        url = base_url.rstrip("/") + "/chat/completions"
        # One request per image: batch_size only bounds RemoteReward's own batching, which the judge does not use.
        self._client = RemoteReward(
            url,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            headers=headers,
            image_format=image_format,
            name=name or "vlm_judge",
        )
        self.url = self._client.url
        self.model = model
        self.question = question
        self.scoring = scoring
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.score_range = (low, high)
        self.__name__ = name or "vlm_judge"
        defaults: dict[str, Any] = {"temperature": 0.0}
        if scoring == "yes_probability":
            defaults.update(max_tokens=1, logprobs=True, top_logprobs=_TOP_LOGPROBS)
        else:
            defaults.update(max_tokens=256)
        self.generation_kwargs = {**defaults, **generation_kwargs}
        try:
            json.dumps(self.generation_kwargs, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"VLMJudge: generation_kwargs must be JSON values ({error}).") from None

    def __repr__(self) -> str:
        return f"VLMJudge({self.url!r}, model={self.model!r}, scoring={self.scoring!r}, name={self.__name__!r})"

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail in seconds, before a model is loaded, when nothing listens at the judge's host and port."""
        self._client.check_reachable(timeout)

    def check_columns(self, column_names: Sequence[str], dataset_name: str = "train_dataset") -> None:
        """Refuse, before training, a question placeholder that neither `prompt` nor a column of the dataset fills."""
        missing = sorted(self._placeholders - {"prompt", *column_names})
        if missing:
            raise ValueError(
                f"VLM judge {self.__name__!r}: its question has the placeholder(s) {{{'}, {'.join(missing)}}}, but "
                f"{dataset_name} has no such column (columns: {', '.join(sorted(column_names)) or 'none'}). Add the "
                "column to the dataset, or change the question."
            )

    def __call__(self, prompts: Sequence[str], images: Sequence[Image.Image], **kwargs: Any) -> list[float | None]:
        """One reward (or `None`) per image, in order, from one chat request per image, `max_concurrency` at a
        time."""
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images; give one prompt per image.")
        columns = {
            key: values
            for key, values in kwargs.items()
            if key != "trainer_state" and isinstance(values, (list, tuple)) and len(values) == len(images)
        }
        self.check_columns(list(columns), dataset_name="the batch")
        questions = [
            self.question.format(prompt=prompt, **{key: values[i] for key, values in columns.items()})
            for i, prompt in enumerate(prompts)
        ]
        return _concurrently(
            self._judge, [([image], question) for image, question in zip(images, questions)], self.max_concurrency
        )

    def _judge(
        self, images: list[Image.Image], question: str, answers: tuple[str, str] = ("yes", "no")
    ) -> float | None:
        """The reward of one request showing `images` (in order, before the question): P(answers[0]) among the two
        answers under `"yes_probability"`, the parsed number under `"score"`."""
        content: list[dict[str, Any]] = [
            {
                "type": "image_url",
                "image_url": {
                    "url": f"data:image/{self._client.image_format.lower()};base64,{self._client._encode(image)}"
                },
            }
            for image in images
        ]
        content.append({"type": "text", "text": question})
        request = {"model": self.model, "messages": [{"role": "user", "content": content}], **self.generation_kwargs}
        body = self._client._post(json.dumps(request).encode("utf-8"))
        choice = self._choice(body)
        if self.scoring == "yes_probability":
            return self._yes_probability(choice, body, answers)
        return self._score(choice, body)

    def _fail(self, problem: str, body: bytes) -> ValueError:
        return ValueError(
            f"VLM judge {self.__name__!r} at {self.url} (scoring={self.scoring!r}): {problem}. "
            f"Response body: {self._client._show(body)}"
        )

    def _choice(self, body: bytes) -> dict:
        try:
            response = json.loads(body)
        except ValueError as error:  # also UnicodeDecodeError
            raise self._fail(f"the response is not JSON ({type(error).__name__}: {error})", body) from None
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            count = f"{len(choices)} choices" if isinstance(choices, list) else 'no "choices" list'
            raise self._fail(
                f"the server answered with {count} for one request; an OpenAI-compatible chat server answers one "
                'choice per request (do not set "n")',
                body,
            )
        return choices[0]

    def _yes_probability(self, choice: dict, body: bytes, answers: tuple[str, str]) -> float | None:
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        first = content[0] if isinstance(content, list) and content and isinstance(content[0], dict) else {}
        top = first.get("top_logprobs")
        if not isinstance(top, list) or not top:
            raise self._fail(
                "the server returned no top_logprobs for the first token, which this mode reads P(yes) from. "
                "vLLM and SGLang return them when asked (the judge asks with logprobs=true, top_logprobs); a server "
                "that ignores the request (transformers serve does) can only be used with scoring='score'",
                body,
            )
        yes = no = 0.0
        for entry in top:
            token, logprob = (entry.get("token"), entry.get("logprob")) if isinstance(entry, dict) else (None, None)
            if not isinstance(token, str) or not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
                raise self._fail(f"a top_logprobs entry is {entry!r}, not {{'token': str, 'logprob': number}}", body)
            word = token.strip().lower()
            if word == answers[0]:
                yes += math.exp(logprob)
            elif word == answers[1]:
                no += math.exp(logprob)
        if yes + no == 0.0:
            logger.warning(
                "VLM judge %r at %s: neither %r nor %r is among the first token's top_logprobs (%s); the sample "
                "scores None. Ask the question so that the answer starts with one of them.",
                self.__name__,
                self.url,
                *answers,
                self._client._redact(", ".join(repr(entry["token"]) for entry in top)),
            )
            return None
        return yes / (yes + no)

    def _score(self, choice: dict, body: bytes) -> float | None:
        message = choice.get("message")
        answer = message.get("content") if isinstance(message, dict) else None
        if not isinstance(answer, str):
            raise self._fail('the choice has no "message" with a text "content"', body)
        score = parse_score(answer)
        low, high = self.score_range
        if score is None or not low <= score <= high:
            shown = answer if len(answer) <= _MAX_ANSWER_CHARS else answer[:_MAX_ANSWER_CHARS] + "..."
            logger.warning(
                "VLM judge %r at %s: no score from %g to %g in the answer %r; the sample scores None.",
                self.__name__,
                self.url,
                low,
                high,
                self._client._redact(shown),
            )
            return None
        return score


def _concurrently(func: Any, calls: list[tuple], max_concurrency: int) -> list:
    """`[func(*args) for args in calls]`, at most `max_concurrency` at a time, results in order."""
    workers = min(max_concurrency, len(calls))
    if workers <= 1:
        return [func(*args) for args in calls]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm-judge")
    try:
        futures = [pool.submit(func, *args) for args in calls]
        return [future.result() for future in futures]
    finally:
        # On an error, requests not yet started are dropped rather than sent to a server known to fail.
        pool.shutdown(wait=True, cancel_futures=True)


#: The pairwise question: the first image shown is "1", the second "2".
PAIRWISE_QUESTION = (
    'Which of the two images better matches the description "{prompt}" and is the better image? '
    "Answer 1 for the first image or 2 for the second."
)


class PairwiseWinRate:
    """A group-wise reward (Pref-GRPO's win rate): a VLM judge compares every pair of images of one prompt's group,
    and each image scores its share of wins against the others, in [0, 1].

    Called once per group (see `trl_guard.rewards.group_reward`): a group of `n` images costs `n (n - 1) / 2` chat
    requests, each showing two images (28 for `num_generations=8`, 120 for 16), `max_concurrency` at a time. Each
    pair is asked once; which image of it is shown first alternates from pair to pair, so the judge's bias towards a
    position cancels out on average rather than favouring the lower index.

    Under `scoring="yes_probability"` a comparison is soft: the first image wins `P("1") / (P("1") + P("2"))` of it,
    from the first token's logprobs. Under `"score"` it is hard: the answer's number (1 or 2) names the winner, and a
    comparison whose answer names neither is left out (with a warning). An image left with no comparison scores
    `None`.

    Args:
        base_url, model, api_key_env, max_concurrency, timeout, max_retries, backoff, image_format,
        **generation_kwargs: As `VLMJudge`'s.
        question: The text sent after the two images, filled with `prompt` and the group's columns (the first
            image's values). It must ask for 1 or 2.
        scoring: `"yes_probability"` (soft) or `"score"` (hard).
        name: The name the reward is logged under; `"win_rate"` by default.

    Example:
        >>> reward = PairwiseWinRate("http://127.0.0.1:8000/v1", "CodeGoat24/UnifiedReward-qwen-7b")
        >>> reward.__name__, reward.scores_groups
        ('win_rate', True)
    """

    #: Marks a group-wise reward: the trainer calls it with one prompt's whole group at a time.
    scores_groups = True

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        question: str = PAIRWISE_QUESTION,
        scoring: str = "yes_probability",
        name: str | None = None,
        **judge_kwargs: Any,
    ):
        if "score_range" in judge_kwargs:
            raise ValueError("PairwiseWinRate: the answer is 1 or 2; score_range is not an argument.")
        self.judge = VLMJudge(
            base_url,
            model,
            question=question,
            scoring=scoring,
            score_range=(1, 2),
            name=name or "win_rate",
            **judge_kwargs,
        )
        self.__name__ = self.judge.__name__

    def __repr__(self) -> str:
        judge = self.judge
        return (
            f"PairwiseWinRate({judge.url!r}, model={judge.model!r}, scoring={judge.scoring!r}, name={self.__name__!r})"
        )

    def check_reachable(self, timeout: float = 5.0) -> None:
        self.judge.check_reachable(timeout)

    def check_columns(self, column_names: Sequence[str], dataset_name: str = "train_dataset") -> None:
        self.judge.check_columns(column_names, dataset_name)

    def __call__(self, prompts: Sequence[str], images: Sequence[Image.Image], **kwargs: Any) -> list[float | None]:
        """Each image's share of wins against the other images of the call, which is one group."""
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images; give one prompt per image.")
        columns = {
            key: values
            for key, values in kwargs.items()
            if key != "trainer_state" and isinstance(values, (list, tuple)) and len(values) == len(images)
        }
        self.judge.check_columns(list(columns), dataset_name="the group")
        if len(images) < 2:
            return [None] * len(images)
        question = self.judge.question.format(prompt=prompts[0], **{key: values[0] for key, values in columns.items()})
        pairs = [(i, j) if (i + j) % 2 else (j, i) for i in range(len(images)) for j in range(i + 1, len(images))]
        outcomes = _concurrently(
            self._compare,
            [(images[first], images[second], question) for first, second in pairs],
            self.judge.max_concurrency,
        )
        wins = [0.0] * len(images)
        counts = [0] * len(images)
        for (first, second), first_wins in zip(pairs, outcomes):
            if first_wins is None:
                continue
            wins[first] += first_wins
            wins[second] += 1.0 - first_wins
            counts[first] += 1
            counts[second] += 1
        return [win / count if count else None for win, count in zip(wins, counts)]

    def _compare(self, first: Image.Image, second: Image.Image, question: str) -> float | None:
        """How much of the comparison the first image wins: P("1") among "1" and "2", or 1.0 / 0.0 from the answer."""
        outcome = self.judge._judge([first, second], question, answers=("1", "2"))
        if outcome is None or self.judge.scoring == "yes_probability":
            return outcome
        if outcome not in (1.0, 2.0):
            logger.warning(
                "Win rate %r: the judge answered %g, neither 1 nor 2; the comparison is left out.",
                self.__name__,
                outcome,
            )
            return None
        return 1.0 if outcome == 1.0 else 0.0
