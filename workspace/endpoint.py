"""One client for every OpenAI-compatible endpoint the workspace talks to (a served vLLM, a judge, a team's
gateway): the `openai` package with a timeout, bounded retries and the API key read from the environment
variable the configuration names (`serving.api_key_env`, `eval.judge.api_key_env`); the key itself is never
written to a config file, a log or an MLflow run.

Consumers: custom-metric generation and the LLM judge (eval/), lm-eval's `local-completions` (`lm_eval_args`),
`make ask` (rag/), the load benchmark and the SLO check (`bench_env`), the serve check (serving/).
A refused key is an EndpointError naming the variable to set, not a traceback.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Optional

# vLLM's sampling parameters outside the OpenAI API: sent in the request body (the client's extra_body)
VLLM_PARAMS = ("include_stop_str_in_output", "structured_outputs", "repetition_penalty", "top_k", "min_p")

class EndpointError(RuntimeError):
    """The endpoint is unreachable, refused the key, or answered with an error; the message names the URL and,
    for a key problem, the environment variable."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    model: str = ""
    api_key_env: Optional[str] = None  # the NAME of the variable holding the key
    timeout_s: float = 300.0
    max_retries: int = 2  # connection errors, 408/409/429/5xx (the openai client's policy), with backoff
    concurrency: int = 4

    def with_model(self, model: str) -> "Endpoint":
        return replace(self, model=model)

    @property
    def api_key(self) -> Optional[str]:
        """The key, or None when no variable is configured. A configured variable that is unset is an error."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EndpointError(f"{self.base_url} needs an API key: the environment variable {self.api_key_env} is not set "
                                f"(the configuration names it). Export it, e.g. `export {self.api_key_env}=...`")
        return key

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", timeout=self.timeout_s,
                      max_retries=self.max_retries)

    def explain(self, exc: Exception) -> EndpointError:
        """An openai exception as an EndpointError that says what to do."""
        import openai

        if isinstance(exc, EndpointError):
            return exc
        if isinstance(exc, openai.AuthenticationError):
            where = (f"the key in ${self.api_key_env}" if self.api_key_env else
                     "no key (the configuration names no api_key_env variable)")
            fix = (f"set {self.api_key_env} to the key the server was started with" if self.api_key_env else
                   "set serving.api_key_env (or eval.judge.api_key_env) to the name of a variable holding the key")
            return EndpointError(f"{self.base_url} refused {where} (401 Unauthorized): {fix}")
        if isinstance(exc, openai.APIConnectionError):
            return EndpointError(f"{self.base_url} is unreachable ({type(exc).__name__}: {exc}). Is the server running?")
        if isinstance(exc, openai.APIStatusError):
            return EndpointError(f"{self.base_url} answered {exc.status_code} for model {self.model!r}: "
                                 f"{str(exc.message)[:300]}")
        return EndpointError(f"{self.base_url}: {type(exc).__name__}: {exc}")

    def models(self) -> list[str]:
        """The served model names (GET /models): a cheap check that the endpoint is up and accepts the key."""
        try:
            return [m.id for m in self.client().models.list().data]
        except Exception as exc:  # noqa: BLE001 - named below
            raise self.explain(exc) from exc

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, seed: Optional[int] = 0,
             response_format: Optional[dict] = None, client=None, sampling: Optional[dict] = None
             ) -> tuple[str, int, Optional[str]]:
        """One chat completion: (text, completion tokens, finish_reason). `sampling`: more sampling parameters
        (frequency_penalty, presence_penalty, stop; vLLM's own, such as include_stop_str_in_output, go in the body)."""
        extra: dict = {"response_format": response_format} if response_format else {}
        sampling = dict(sampling or {})
        body = {k: sampling.pop(k) for k in VLLM_PARAMS if k in sampling}  # not arguments of the openai client
        extra.update(sampling, **({"extra_body": body} if body else {}))
        try:
            reply = (client or self.client()).chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed, **extra)
        except Exception as exc:  # noqa: BLE001 - named below
            raise self.explain(exc) from exc
        choice = reply.choices[0]
        tokens = reply.usage.completion_tokens if reply.usage else 0
        return (choice.message.content or "").strip(), tokens, choice.finish_reason

    def chat_many(self, conversations: list[list[dict]], *, max_tokens: int,
                  progress: Optional[Callable[[int], None]] = None, sampling: Optional[dict] = None
                  ) -> list[tuple[str, int]]:
        """Greedy chat completions, `concurrency` in flight, results in input order."""
        client = self.client()
        done = [0]

        def one(messages: list[dict]) -> tuple[str, int]:
            text, tokens, _ = self.chat(messages, max_tokens=max_tokens, client=client, sampling=sampling)
            done[0] += 1
            if progress:
                progress(done[0])
            return text, tokens

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, conversations))

    def lm_eval_args(self, tokenizer: str) -> dict:
        """model_args of lm-eval's `local-completions` for this endpoint (token ids, echo + logprobs), with the
        key as its Authorization header."""
        args = {"model": self.model, "base_url": f"{self.base_url}/completions", "tokenizer": tokenizer,
                # token ids, not text: the server scores exactly the tokens the hf scorer scores
                "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": self.concurrency,
                "max_retries": max(1, self.max_retries + 1), "timeout": int(self.timeout_s)}
        key = self.api_key
        if key:
            args["header"] = {"Authorization": f"Bearer {key}"}
        return args

    def bench_env(self) -> dict[str, str]:
        """Environment for `vllm bench serve`, which sends $OPENAI_API_KEY as its bearer token."""
        key = self.api_key
        return {"OPENAI_API_KEY": key} if key else {}


# The variable `make serve`, `make gateway` and `make ask` fill from the workspace's own key file when
# serving.api_key_env names none: vLLM on the host is never open without a key (the gateway's tokens, limits and
# usage log would be a bypass away), and a user who names a variable of their own keeps it.
INTERNAL_KEY_ENV = "LLMOPS_SERVE_KEY"


def internal_key_overrides(api_key_env: Optional[str], key_file) -> list[str]:
    """[] when serving.api_key_env is set; else the key from `key_file` (created once with a random key, 0600,
    written to a temporary name and renamed) put in $LLMOPS_SERVE_KEY of this process, and the override that names
    it: `serving.api_key_env=LLMOPS_SERVE_KEY`."""
    import secrets
    from pathlib import Path

    if api_key_env:
        return []
    path = Path(key_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("llmops-serve-" + secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)  # never replaces a key another process wrote first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise EndpointError(f"{path} is empty: delete it (make serve writes a new key) or set serving.api_key_env")
    os.environ[INTERNAL_KEY_ENV] = key
    return [f"serving.api_key_env={INTERNAL_KEY_ENV}"]
