"""How a text becomes the token ids the LLM (and so the probe) sees.

``chat`` applies the model's chat template with the generation prompt: the serving view,
exactly what the deployed model receives before it answers. ``raw`` tokenises the text as is.
Prompts over ``max_length`` tokens are truncated by cutting the end of the *user text*, so
the template and generation prompt stay intact; every truncation is counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from singlepass.errors import SinglepassError

PROMPT_FORMATS = ("chat", "raw")
DEFAULT_MAX_LENGTH = 512


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
    truncated: list[bool]

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)

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
