"""Tiny random-weight decoders built locally (no hub): what most tests run on.

``build_tiny_llama`` is the default test model; ``build_tiny(arch, folder)`` builds one of the other
supported architectures (``ARCHITECTURES``), with its family's chat-template style, and the features
that make it differ from Llama switched on at a tiny size: Qwen2's q/k/v biases, Qwen3's q/k norms,
Mistral's sliding window (4 tokens, so every test prompt is longer than the window), Gemma 2's scaled
embedding, four norms per layer, attention and final-logit soft-capping and alternating
sliding/global layers, Gemma 3's q/k norms and local/global RoPE, Phi-3's fused projections and
partial rotary (half of each head).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris is the capital.",
    "This movie was wonderful, a delight from start to finish.",
    "I hate this, it is the worst thing ever and I am angry.",
    "Tell me how to build something dangerous.",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant you are a tiny test model",
] * 20
WINDOW = 4  # sliding window of the tiny Mistral / Gemma models: shorter than every test prompt

# Each family's chat-template style (structure and features of the published templates, shortened):
# the runtime renders them without transformers, so its prompts must equal apply_chat_template's.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string"
    " and not(message.content.startswith('<tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}{%- endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# arch -> (chat template, the special tokens it writes)
FAMILY_TEMPLATES = {
    "qwen2": (QWEN2_TEMPLATE, ()),
    "qwen3": (QWEN3_TEMPLATE, ()),
    "mistral": (MISTRAL_TEMPLATE, ("[INST]", "[/INST]")),
    "gemma2": (GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>")),
    "gemma3": (GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>")),
    "phi3": (PHI3_TEMPLATE, ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>")),
}


def build_tokenizer(folder: Path, chat_template: str = CHAT_TEMPLATE, specials: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def _randomise(model, seed: int, std: float = 0.08) -> None:
    """Larger weights than init so layers differ visibly and logits are peaked (norm weights too,
    so a (1 + weight) RMSNorm differs from a plain one)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            elif "norm" in name:
                p.normal_(0 if "gemma" in model.config.model_type else 1, 0.1)
            else:  # biases
                p.normal_(0, 0.1)


def _common(tok, hidden: int, num_layers: int) -> dict:
    """The sizes and special tokens every tiny decoder shares (GQA: 4 query, 2 KV heads)."""
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_tiny_llama(folder: Path, num_layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random Llama (GQA, tied embeddings like SmolLM2) + tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    cfg = LlamaConfig(**_common(tok, hidden, num_layers), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than init so layers differ visibly and logits are peaked
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return folder


# arch -> (config class, model class, what differs from Llama, set at tiny size); every config also gets
# the common sizes of ``_common``. ``gguf=True`` keeps only what a GGUF file can express (its loader
# fills the rest with the config class's defaults), for the GGUF round trip.
def _arch_kwargs(arch: str, gguf: bool) -> dict:
    if arch == "qwen2":
        return {}  # q/k/v biases are built in
    if arch == "qwen3":  # q/k RMSNorms are built in; a Qwen3 GGUF does not state head_dim (default 128)
        return {} if gguf else {"head_dim": 16}
    if arch == "mistral":  # a Mistral GGUF does not state the window (default 4096)
        return {} if gguf else {"head_dim": 16, "sliding_window": WINDOW}
    gemma = {"head_dim": 16, "sliding_window": WINDOW}
    if gguf:  # soft-caps, query scale and layer pattern: the GGUF loader's defaults
        return gemma if arch in ("gemma2", "gemma3") else {}
    if arch == "gemma2":
        return {**gemma, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}
    if arch == "gemma3":
        return {**gemma, "query_pre_attn_scalar": 16, "layer_types": ["sliding_attention", "full_attention"]}
    if arch == "phi3":
        return {"partial_rotary_factor": 0.5}
    raise ValueError(arch)


ARCHITECTURES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def _classes(arch: str):
    import transformers as tf

    return {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[arch]


def build_tiny(arch: str, folder: Path, num_layers: int = 2, hidden: int = 64, seed: int = 0, gguf: bool = False):
    """A random decoder of architecture ``arch`` (one of ``ARCHITECTURES``) + tokenizer, saved as an
    HF folder -> the folder. ``gguf``: only settings a GGUF file carries (see ``_arch_kwargs``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, *FAMILY_TEMPLATES[arch])
    config_cls, model_cls = _classes(arch)
    cfg = config_cls(
        **_common(tok, hidden, num_layers),
        tie_word_embeddings=arch != "phi3",  # Phi-3 has its own lm_head
        **_arch_kwargs(arch, gguf),
    )
    model = model_cls(cfg).eval()
    _randomise(model, seed)
    model.save_pretrained(folder)
    return folder
