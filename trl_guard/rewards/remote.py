"""A reward computed by a server in another process or on another machine (a GenEval server, a VLM judge), over HTTP.

Protocol (what a server must implement)
---------------------------------------

`RemoteReward` splits a call into batches of at most ``batch_size`` samples, in order, and sends each batch as one
request, one request at a time::

    POST <url>
    Content-Type: application/json
    <the headers given to RemoteReward, e.g. Authorization>

    {
        "prompts": ["a photo of a cat", ...],
        "images": ["iVBORw0KGgo...", ...],
        "metadata": {"tag": ["single_object", ...], "include": [[...], ...]}
    }

- ``prompts``: list of str, one per image.
- ``images``: list of str, one per prompt, each the standard base64 (with ``=`` padding, no ``data:`` prefix) of an
  image file in ``image_format`` (PNG by default; ``Image.open(io.BytesIO(base64.b64decode(s)))`` reads it).
- ``metadata``: object, always present (possibly ``{}``). It holds the dataset's other columns that the trainer
  passes as keyword arguments: every one that is a list (or tuple) with one entry per image and serialises to strict
  JSON, sliced to the batch like ``prompts``. ``trainer_state`` and any other argument are left out.

The server answers ``200`` with a JSON object holding one score per image of the batch, in order::

    {"scores": [0.83, null, 1.0, ...]}

Each score is a finite number, or ``null`` when the reward does not apply to that sample (it becomes ``None``).
Other keys in the object are ignored.

Failures:

- Connection errors, timeouts (``timeout`` seconds per socket operation), HTTP ``429`` and ``5xx`` are retried up to
  ``max_retries`` times, waiting ``backoff * 2**attempt`` seconds after failed attempt number ``attempt`` (0, 1, ...).
  When every attempt fails, :class:`RemoteRewardError` (a ``ConnectionError``) names the URL, the number of attempts
  and the last error.
- Any other status (``4xx``, redirects: they are not followed so that credentials never go to another host) raises
  :class:`RemoteRewardError` at once, with the response body.
- A ``200`` whose body is not JSON, has no ``"scores"`` list, has the wrong number of scores, or a score that is not a
  finite number or ``null``, raises ``ValueError`` showing (the start of) the body.

Header values and the password or query of the URL are replaced by ``***`` in every message and log line.

A minimal server with the standard library (a real one would run its model where ``score`` is)::

    import base64, io, json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from PIL import Image

    def score(prompt, image, **metadata):
        return image.width / 1000

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            images = [Image.open(io.BytesIO(base64.b64decode(s))) for s in batch["images"]]
            columns = batch["metadata"]
            scores = [
                score(prompt, image, **{key: values[i] for key, values in columns.items()})
                for i, (prompt, image) in enumerate(zip(batch["prompts"], images))
            ]
            body = json.dumps({"scores": scores}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

# Enough of a response body to recognise an error page or a traceback without flooding the log.
_MAX_BODY_CHARS = 500
# Parts of header values shorter than this are too common to scrub from messages ("Bearer", "true", ...).
_MIN_SECRET_PART = 8
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    # PNG stays lossless at any level; level 1 encodes 2-3x faster than the default 6 for ~1.5x the bytes, and on a
    # LAN or loopback link the encoding, not the transfer, is what costs time.
    "PNG": {"compress_level": 1},
    # Judges see artefacts at Pillow's default quality (75).
    "JPEG": {"quality": 95},
    "WEBP": {"quality": 95},
}


class RemoteRewardError(ConnectionError):
    """A scoring server could not be reached, kept failing, or refused the request.

    Attributes:
        url: The server's URL as shown in messages (credentials and query hidden).
        attempts: The number of requests made before giving up.
        status: The HTTP status of the last response, or `None` if none arrived (connection error, timeout).
    """

    def __init__(self, message: str, url: str | None = None, attempts: int | None = None, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would re-send a redirected POST as a GET, with the Authorization header, possibly to another host.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class RemoteReward:
    """Scores images with a model served over HTTP (see the module docstring for the protocol).

    Args:
        url: The server's endpoint, `http://` or `https://`. `user:password@` in it is sent as HTTP basic auth.
        batch_size: The most samples sent in one request.
        timeout: Seconds to wait on each socket operation (connecting, then each read) of a request.
        max_retries: How many times a failed request is retried (connection errors, timeouts, HTTP 429 and 5xx).
        backoff: Seconds to wait before the first retry; the wait doubles at each retry.
        headers: Extra HTTP headers, e.g. `{"Authorization": "Bearer ..."}`. Their values never appear in errors.
        image_format: A format Pillow can save (`"PNG"`, `"JPEG"`, `"WEBP"`) in which images are sent.
        name: The name the reward is logged under (`rewards/{name}/mean`); `"remote"` by default.

    Example:
        >>> from PIL import Image
        >>> reward = RemoteReward("http://127.0.0.1:8000/score", batch_size=8, name="geneval")
        >>> reward.__name__
        'geneval'
        >>> reward(["a red cube"], [Image.new("RGB", (64, 64), "red")], tag=["color"])  # doctest: +SKIP
        [1.0]
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 16,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        headers: dict[str, str] | None = None,
        image_format: str = "PNG",
        name: str | None = None,
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # The URL may hold a password: name only its scheme in the message.
            raise ValueError(f"RemoteReward needs an http:// or https:// URL with a host, got a {parts.scheme!r} URL.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}.")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}.")
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0, got {backoff!r}.")
        image_format = image_format.upper()
        Image.init()
        if image_format not in Image.SAVE:
            raise ValueError(f"Pillow cannot save images as {image_format!r}; use 'PNG', 'JPEG' or 'WEBP'.")

        host = parts.netloc.rpartition("@")[2]
        self._request_url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
        self.url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "***" if parts.query else "", ""))
        self.batch_size = batch_size
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.image_format = image_format
        self.__name__ = name or "remote"

        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "trl-guard"}
        self._headers.update(headers or {})
        secrets = [str(value) for value in (headers or {}).values()]
        if parts.username is not None:
            user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
            if not any(key.lower() == "authorization" for key in self._headers):
                credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
                self._headers["Authorization"] = f"Basic {credentials}"
                secrets.append(credentials)
            secrets.append(password)
        secrets += [value for _, value in urllib.parse.parse_qsl(parts.query)]
        # Whole values first, then their words ("sk-..." of "Bearer sk-..."), longest first so that no shorter
        # secret is replaced inside a longer one and leaves the rest of it readable.
        parts_of_secrets = [word for secret in secrets for word in secret.split() if len(word) >= _MIN_SECRET_PART]
        self._secrets = sorted({s for s in secrets + parts_of_secrets if s}, key=len, reverse=True)

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Open (and close) a TCP connection to the server, so a wrong host or port fails in seconds, before a
        model is loaded, rather than after the first rollout. Sends no request: the protocol has no health call."""
        parts = urllib.parse.urlsplit(self._request_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as error:
            raise RemoteRewardError(
                f"The remote reward at {self.url} is unreachable ({self._redact(str(error)) or type(error).__name__}). "
                "Start its server, or fix the host and port.",
                url=self.url,
                attempts=1,
            ) from None

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, name={self.__name__!r}, batch_size={self.batch_size})"

    def __call__(self, prompts: Sequence[str], images: Sequence[Image.Image], **kwargs: Any) -> list[float | None]:
        """One score (or `None`) per image, from one request per batch of `batch_size` samples, in order.

        Keyword arguments that are lists with one JSON value per image (dataset columns) are sent as `"metadata"`.
        """
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images; give one prompt per image.")
        columns = self._metadata_columns(kwargs, len(images))
        scores: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            end = min(start + self.batch_size, len(images))
            payload = {
                "prompts": list(prompts[start:end]),
                "images": [self._encode(image) for image in images[start:end]],
                "metadata": {key: values[start:end] for key, values in columns.items()},
            }
            body = self._post(json.dumps(payload).encode("utf-8"))
            scores.extend(self._parse_scores(body, end - start, start))
        return scores

    def _metadata_columns(self, kwargs: dict[str, Any], num_images: int) -> dict[str, list]:
        columns = {}
        for key, values in kwargs.items():
            if key == "trainer_state" or not isinstance(values, (list, tuple)) or len(values) != num_images:
                continue
            try:
                # allow_nan=False: NaN is not JSON, and strict servers reject the whole request over it.
                json.dumps(values, allow_nan=False)
            except (TypeError, ValueError):
                logger.debug("RemoteReward %r: column %r is not JSON-serialisable; not sent.", self.__name__, key)
                continue
            columns[key] = list(values)
        return columns

    def _encode(self, image: Image.Image) -> str:
        if self.image_format in ("JPEG", "WEBP") and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format=self.image_format, **_SAVE_OPTIONS.get(self.image_format, {}))
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _post(self, data: bytes) -> bytes:
        # An opener per call keeps the reward picklable and copyable (the trainer may deepcopy or spawn it).
        opener = urllib.request.build_opener(_NoRedirect)
        attempts = self.max_retries + 1
        last_error, last_exception, status = "", None, None
        for attempt in range(attempts):
            request = urllib.request.Request(self._request_url, data=data, headers=self._headers, method="POST")
            try:
                with opener.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                status, body = error.code, _read_and_close(error)
                last_error = self._redact(f"HTTP {error.code} {error.reason}; response body: {self._show(body)}")
                last_exception = error
                if not (status == 429 or 500 <= status < 600):
                    advice = (
                        " Redirects are not followed; give the final URL." if 300 <= status < 400 else " Not retried."
                    )
                    raise RemoteRewardError(
                        f"Remote reward {self.__name__!r} at {self.url} answered {last_error}.{advice}",
                        self.url,
                        attempt + 1,
                        status,
                    ) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                status, last_error, last_exception = None, self._describe(error), error
            if attempt + 1 < attempts:
                delay = self.backoff * 2**attempt
                logger.warning(
                    "Remote reward %r at %s: attempt %d/%d failed (%s); retrying in %.3g s.",
                    self.__name__,
                    self.url,
                    attempt + 1,
                    attempts,
                    last_error,
                    delay,
                )
                time.sleep(delay)
        raise RemoteRewardError(
            f"Remote reward {self.__name__!r}: {self.url} failed after {attempts} attempt{'s' * (attempts > 1)} "
            f"(timeout {self.timeout:g} s each); last error: {last_error}",
            self.url,
            attempts,
            status,
        ) from (None if isinstance(last_exception, urllib.error.HTTPError) else last_exception)

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
            error = error.reason
        if isinstance(error, TimeoutError):
            return f"no response within the {self.timeout:g} s timeout"
        if isinstance(error, urllib.error.URLError):
            return self._redact(f"URLError: {error.reason}")
        return self._redact(f"{type(error).__name__}: {error}")

    def _parse_scores(self, body: bytes, expected: int, offset: int) -> list[float | None]:
        def fail(problem: str) -> ValueError:
            return ValueError(
                f"Remote reward {self.__name__!r} at {self.url}: {problem}. The server must answer "
                f'{{"scores": [<number or null>, ...]}} with one score per image ({expected} here). '
                f"Response body: {self._show(body)}"
            )

        try:
            response = json.loads(body)
        except ValueError as error:  # also UnicodeDecodeError
            raise fail(f"the response is not JSON ({type(error).__name__}: {error})") from None
        if not isinstance(response, dict) or "scores" not in response:
            raise fail('the response has no "scores" key')
        values = response["scores"]
        if not isinstance(values, list) or len(values) != expected:
            count = f"{len(values)} scores" if isinstance(values, list) else f"a {type(values).__name__}"
            raise fail(f"the server returned {count} for a batch of {expected} images")
        scores: list[float | None] = []
        for i, value in enumerate(values):
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
            if value is not None and (number is None or not math.isfinite(number)):
                raise fail(f"score {i} of the batch (image {offset + i}) is {value!r}, not a finite number or null")
            scores.append(number)
        return scores

    def _show(self, body: bytes) -> str:
        text = self._redact(body.decode("utf-8", errors="replace"))
        if len(text) > _MAX_BODY_CHARS:
            text = f"{text[:_MAX_BODY_CHARS]}... ({len(text) - _MAX_BODY_CHARS} more characters)"
        return repr(text)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _read_and_close(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""
    finally:
        error.close()
