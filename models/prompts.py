"""How a text becomes the token ids the LLM (and so the probe) sees.

``chat`` applies the model's chat template with the generation prompt: the serving view,
exactly what the deployed model receives before it answers. ``raw`` tokenises the text as is.
Prompts over ``max_length`` tokens are truncated by cutting the end of the *user text*, so
the template and generation prompt stay intact; every truncation is counted and reported.

A *response* (``encode_responses``) is read in the serving view of generation: the prompt's ids
exactly as above, then the response's own tokens as the assistant's answer, with no end-of-turn
token after them (the probe folds in each generated token as it is decoded). Only the response
tokens are stored for the probe: they are the last ``Encoded.stored[i]`` ids of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from singlepass.errors import SinglepassError

PROMPT_FORMATS = ("chat", "raw")
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_RESPONSE_TOKENS = 128  # response tokens a response probe reads (the first ones)
# Rows per extraction pass (at most models/extract's ``max_batch_tokens`` tokens): after the shared chat
# prefix a prompt's own tokens are few (~46 in the demo's safety mixture), and 8 rows made GEMMs too thin for
# the CPU. The demo's 656 validation prompts: 79.0 / 79.0 s at 8 rows, 68.9 / 72.2 / 74.3 s at 32 (71.9 at
# 16, 75.2 at 64; one run each, alternating, on the 2-core AVX2 machine).
EXTRACT_BATCH = 32


def render(tokenizer, text: str, prompt_format: str = "chat") -> str:
    if prompt_format == "raw":
        return text
    if prompt_format != "chat":
        raise SinglepassError(f"unknown prompt format {prompt_format!r} (use {' or '.join(PROMPT_FORMATS)})")
    if not getattr(tokenizer, "chat_template", None):
        raise SinglepassError("this tokenizer has no chat template: use --prompt-format raw")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def _ids(tokenizer, text: str, prompt_format: str) -> list[int]:
    # The chat template already holds the special tokens; raw text gets the tokenizer's own.
    return tokenizer(render(tokenizer, text, prompt_format), add_special_tokens=prompt_format == "raw")["input_ids"]


@dataclass
class Encoded:
    ids: list[list[int]]
    truncated: list[bool]  # the prompt was cut to max_length
    # Response views: the response tokens at the end of each sequence (what is stored), and how
    # many tokens each response lost to max_response_tokens. None: a prompt view (store them all).
    stored: list[int] | None = None
    response_cut: list[int] | None = None

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)

    @property
    def keep(self) -> list[int]:
        """Tokens per row to store: the last ``keep[i]`` of ``ids[i]``."""
        return [len(s) for s in self.ids] if self.stored is None else list(self.stored)

    @property
    def n_response_truncated(self) -> int:
        return sum(c > 0 for c in self.response_cut or [])

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.ids)


def encode_one(
    tokenizer, text: str, prompt_format: str = "chat", max_length: int = DEFAULT_MAX_LENGTH, truncate: bool = True
) -> tuple[list[int], bool]:
    if not isinstance(text, str):
        raise SinglepassError(f"prompt must be a string, got {type(text).__name__}")
    if not text.strip():
        raise SinglepassError("prompt is empty")
    ids = _ids(tokenizer, text, prompt_format)
    if len(ids) <= max_length:
        return ids, False
    if not truncate:
        raise SinglepassError(f"prompt has {len(ids)} tokens, over the maximum of {max_length}")
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(body) - (len(ids) - max_length)
    for _ in range(8):  # re-tokenisation at the cut can shift by a token or two
        if keep <= 0:
            break
        ids = _ids(tokenizer, tokenizer.decode(body[:keep]), prompt_format)
        if len(ids) <= max_length:
            return ids, True
        keep -= len(ids) - max_length
    raise SinglepassError(f"max length {max_length} is too short for the prompt template itself")


def encode(
    tokenizer,
    texts: list[str],
    prompt_format: str = "chat",
    max_length: int = DEFAULT_MAX_LENGTH,
    truncate: bool = True,
) -> Encoded:
    out = Encoded([], [])
    for i, t in enumerate(texts):
        try:
            ids, cut = encode_one(tokenizer, t, prompt_format, max_length, truncate)
        except SinglepassError as e:
            raise SinglepassError(f"prompt {i}: {e}") from None
        out.ids.append(ids)
        out.truncated.append(cut)
    return out


def encode_responses(
    tokenizer,
    prompts: list[str],
    responses: list[str],
    prompt_format: str = "chat",
    max_length: int = DEFAULT_MAX_LENGTH,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> Encoded:
    """Each (prompt, response) as the model sees it while generating the response: the prompt's
    ids as ``encode_one`` gives them (user text cut to fit ``max_length``), then the first
    ``max_response_tokens`` of ``tokenizer(response, add_special_tokens=False)``, no end-of-turn
    token. ``stored[i]`` is that response token count, ``response_cut[i]`` the tokens cut off."""
    if max_response_tokens <= 0:
        raise SinglepassError(f"max response tokens must be positive, got {max_response_tokens}")
    if len(prompts) != len(responses):
        raise SinglepassError(f"{len(prompts)} prompts but {len(responses)} responses")
    out = Encoded([], [], [], [])
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            ids, cut = encode_one(tokenizer, prompt, prompt_format, max_length)
            if not isinstance(response, str) or not response.strip():
                raise SinglepassError("response is empty" if isinstance(response, str) else "response is not a string")
            reply = tokenizer(response, add_special_tokens=False)["input_ids"]
            if not reply:
                raise SinglepassError("response has no tokens")
        except SinglepassError as e:
            raise SinglepassError(f"row {i}: {e}") from None
        kept = reply[:max_response_tokens]
        out.ids.append(ids + kept)
        out.truncated.append(cut)
        out.stored.append(len(kept))
        out.response_cut.append(len(reply) - len(kept))
    return out
