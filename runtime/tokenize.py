"""Prompt -> token ids exactly as training formatted it (``models/prompts.py``), without transformers.

``tokenizers.Tokenizer.from_file(ART/tokenizer.json)`` does the tokenising; the manifest's chat
template is rendered with jinja2 the way transformers' ``apply_chat_template`` renders it (a
sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
``strftime_now``, a non-escaping ``tojson``, the named special tokens as variables, and
``messages = [{"role": "user", "content": TEXT}]`` with ``add_generation_prompt``). Chat prompts
are tokenised without added special tokens (the template holds them); raw prompts with the
tokenizer's own. A prompt over the maximum is an error, or with ``truncate=True`` loses the end of
its *user text* (the template stays intact), the same cut ``models/prompts.py`` makes.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from singlepass.errors import SinglepassError
from singlepass.runtime.contract import Manifest

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization (applied on decode only where the tokenizer config asks
# for it, and never for BPE models unless forced, as transformers does)
CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SinglepassError(f"{path}: corrupt ({e})") from None
    return d if isinstance(d, dict) else {}


def _token_text(v) -> str | None:
    if isinstance(v, dict):  # serialised AddedToken
        v = v.get("content")
    return v if isinstance(v, str) else None


def compile_template(source: str):
    """A jinja2 template compiled like transformers' ``_compile_jinja_template``."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise SinglepassError(f"the artifact's chat template does not compile ({e})") from None


class PromptTokenizer:
    """Tokeniser + prompt format of an artifact folder (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, the manifest's ``prompt`` section)."""

    def __init__(self, folder: str | Path, manifest: Manifest):
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception
            raise SinglepassError(f"{folder}/tokenizer.json cannot be loaded ({str(e)[:200]})") from None
        pr = manifest.prompt
        self.format = pr.get("format", "chat")
        if self.format not in ("chat", "raw"):
            raise SinglepassError(f"{folder}: unknown prompt format {self.format!r} in manifest.json")
        self.add_generation_prompt = pr.get("add_generation_prompt", True)
        cfg = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")
        special.update({k: v for k, v in cfg.items() if k in SPECIAL_TOKEN_NAMES})
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_NAMES if (t := _token_text(special.get(k))) is not None}
        self.template = None
        if self.format == "chat":
            source = pr.get("chat_template") or cfg.get("chat_template")
            if not source and (folder / "chat_template.jinja").is_file():
                source = (folder / "chat_template.jinja").read_text()
            if not source:
                raise SinglepassError(f"{folder}: the prompt format is chat but the artifact has no chat template")
            self.template = compile_template(source)
        # transformers rebuilds the post-processor when the config sets add_bos/eos_token or the
        # tokenizer has none; otherwise tokenizer.json's own post-processor adds special tokens.
        self._rebuild_specials = "add_bos_token" in cfg or "add_eos_token" in cfg or self.tok.post_processor is None
        self._add_bos, self._add_eos = bool(cfg.get("add_bos_token")), bool(cfg.get("add_eos_token"))
        self._cleanup = bool(cfg.get("clean_up_tokenization_spaces", False)) and (
            type(self.tok.model).__name__ != "BPE"
            or bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )

    # -- text -> ids
    def render(self, text: str) -> str:
        if self.format == "raw":
            return text
        import jinja2

        try:
            return self.template.render(
                messages=[{"role": "user", "content": text}],
                tools=None,
                documents=None,
                add_generation_prompt=self.add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise SinglepassError(f"the chat template refuses the prompt ({e})") from None

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if add_special_tokens and self._rebuild_specials:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            bos, eos = self._special_id("bos_token"), self._special_id("eos_token")
            return (
                ([bos] if self._add_bos and bos is not None else [])
                + ids
                + ([eos] if self._add_eos and eos is not None else [])
            )
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _special_id(self, name: str) -> int | None:
        t = self.special_tokens.get(name)
        return None if t is None else self.tok.token_to_id(t)

    def _ids(self, text: str) -> list[int]:
        # The chat template already holds the special tokens; raw text gets the tokenizer's own.
        return self._encode(self.render(text), add_special_tokens=self.format == "raw")

    def encode(self, text, max_length: int, truncate: bool = False) -> tuple[list[int], bool]:
        """-> (ids, truncated). Raises SinglepassError for a non-string, empty or (without
        ``truncate``) too long prompt."""
        if not isinstance(text, str):
            raise SinglepassError(f"prompt must be a string, got {type(text).__name__}")
        if not text.strip():
            raise SinglepassError("prompt is empty")
        ids = self._ids(text)
        if len(ids) <= max_length:
            return ids, False
        if not truncate:
            raise SinglepassError(
                f"prompt has {len(ids)} tokens, over the artifact's maximum of {max_length} "
                "(shorten it, or pass truncate=True / --truncate to cut the end of the text)"
            )
        body = self._encode(text, add_special_tokens=False)
        keep = len(body) - (len(ids) - max_length)
        for _ in range(8):  # re-tokenisation at the cut can shift by a token or two
            if keep <= 0:
                break
            ids = self._ids(self.decode(body[:keep], skip_special_tokens=False))
            if len(ids) <= max_length:
                return ids, True
            keep -= len(ids) - max_length
        raise SinglepassError(f"the maximum prompt length {max_length} is too short for the prompt template itself")

    # -- ids -> text
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._cleanup:
            for a, b in CLEANUPS:
                text = text.replace(a, b)
        return text
