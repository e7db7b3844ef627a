"""Served models: tokenizer, limits, and incremental detokenization."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from services.gateway.chat_template import ChatTemplate
from services.gateway.settings import ModelSettings

# A text at least this long is tokenized in a worker thread, with the library's batch call, which
# releases the GIL: tokenizing a 1M-character prompt takes ~0.6-0.9 s here, and on the event
# loop every other stream of the gateway would stall that long. Shorter texts stay inline (a
# thread hop costs more than tokenizing a few thousand characters).
OFF_LOOP_CHARS: Final = 16_384
# Their own threads, one per CPU: a burst of long prompts queues here, not in the loop's default
# pool, which the usage log's writes and the Redis client's lookups use.
_TOKENIZERS = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="tokenize")
# The prompt's last tokens a completion's text is decoded after: a SentencePiece-style decoder
# (Metaspace, or Replace + Strip) drops the leading space of the text it decodes, so a first
# token "▁Paris" decoded alone reads "Paris" where the completion says " Paris".
DECODE_CONTEXT_TOKENS: Final = 4


@dataclass
class ServedModel:
    settings: ModelSettings
    tokenizer: Tokenizer
    end_id: int
    vocab_size: int
    # Renders chat messages (OpenAI /v1/chat/completions); None: the model has no chat template.
    chat_template: ChatTemplate | None = None
    # Every token id that ends a generation: end_id and the settings' stop_token_ids.
    end_ids: frozenset[int] = field(init=False)
    # The ids the tokenizer's post-processor puts before a text (Llama's <|begin_of_text|>,
    # Mistral's <s>; none for most ChatML models): a text prompt starts with them, as
    # `add_special_tokens=True` gives it; a chat prompt gets them from its template.
    text_prefix: tuple[int, ...] = field(init=False)
    # Matches the text of the special tokens that structure a chat: the tokenizer's special
    # tokens its chat template writes literally (<|im_start|>, <|start_header_id|>, Mistral's
    # [INST]), not those it names (a bos <s> typed as HTML strikethrough stays allowed, parsed
    # as before); None: none, or no chat template.
    control_tokens: re.Pattern[str] | None = field(init=False)

    def __post_init__(self) -> None:
        self.end_ids = frozenset((self.end_id, *self.settings.stop_token_ids))
        self.text_prefix = _post_processor_prefix(self.tokenizer)
        source = "" if self.chat_template is None else self.chat_template.source
        structural = sorted(
            {
                t.content
                for t in self.tokenizer.get_added_tokens_decoder().values()
                if t.special and t.content in source
            },
            key=lambda c: (-len(c), c),
        )
        self.control_tokens = (
            re.compile("|".join(map(re.escape, structural))) if structural else None
        )
        beyond = sorted(t for t in self.end_ids if t >= self.vocab_size)
        if beyond:
            raise ValueError(
                f"model {self.settings.name!r}: end token ids {beyond} are not in the "
                f"vocabulary ({self.vocab_size} tokens)"
            )

    @classmethod
    def load(cls, settings: ModelSettings) -> ServedModel:
        if not settings.tokenizer_path.is_file():
            raise FileNotFoundError(
                f"tokenizer for model {settings.name!r} not found at {settings.tokenizer_path}"
            )
        tok = Tokenizer.from_file(str(settings.tokenizer_path))
        end_id = settings.end_id
        if end_id is None:
            found = tok.token_to_id(settings.eos_token)
            if found is None:
                raise ValueError(
                    f"model {settings.name!r}: EOS token {settings.eos_token!r} not in vocabulary"
                )
            end_id = int(found)
        if settings.chat_template_path is not None:
            template: ChatTemplate | None = ChatTemplate.from_file(
                settings.chat_template_path,
                special_tokens_from=settings.tokenizer_path.parent / "tokenizer_config.json",
            )
        else:
            template = ChatTemplate.for_tokenizer(settings.tokenizer_path)
        return cls(settings, tok, end_id, int(tok.get_vocab_size(with_added_tokens=True)), template)

    @property
    def name(self) -> str:
        return self.settings.name

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def with_text_prefix(self, ids: list[int]) -> list[int]:
        """A text prompt's ids after `text_prefix`, unless they start with it already (the
        text began with the BOS token's text)."""
        prefix = self.text_prefix
        if not prefix or tuple(ids[: len(prefix)]) == prefix:
            return ids
        return [*prefix, *ids]

    async def encode_off_loop(self, text: str) -> list[int]:
        """`encode`, in a worker thread that does not hold the GIL when `text` is long
        (`OFF_LOOP_CHARS`): the event loop serves other streams meanwhile."""
        if len(text) < OFF_LOOP_CHARS:
            return self.encode(text)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_TOKENIZERS, self._encode_released, text)

    def _encode_released(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not); same ids as encode.
        (encoding,) = self.tokenizer.encode_batch([text], add_special_tokens=False)
        return list(encoding.ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def _post_processor_prefix(tok: Tokenizer) -> tuple[int, ...]:
    """What `tok`'s post-processor puts before a text's ids (a suffix, as BERT's [SEP], is not
    for a prompt a model continues)."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return tuple(full[:k])
    return ()


class IncrementalDecoder:
    """Turns a growing token sequence into text deltas without splitting multi-byte characters.

    Each push is one call into the `tokenizers` library's streaming decoder (`DecodeStream`),
    which decodes the new tokens against the last emitted ones inside the library. `flush`
    decodes what it held back (text ending in an incomplete character) the same way, from the
    token offsets kept here, and starts a fresh streaming decoder at offsets past every token. A
    stream the library refuses (its decoded text no longer starts with what it emitted) is
    decoded here until the next flush, with the same offsets.

    `context` (the prompt's last `DECODE_CONTEXT_TOKENS`) is the first delta's context, as
    if its text had been returned: the completion's text is what its tokens add after it. A
    context whose text ends inside a character is not used (its bytes would start the first
    delta's character).

    Invariant: the concatenation of every returned delta plus `flush()` equals
    `decode(context + all tokens)` less `decode(context)` for tokenizers whose decode is
    prefix-stable past `prefix_offset`; and every token before `read_offset` has had its text
    returned.
    """

    __slots__ = ("_ids", "_prefix_offset", "_read_offset", "_step", "_tokenizer")

    def __init__(self, model: ServedModel, context: Sequence[int] = ()) -> None:
        self._tokenizer = model.tokenizer
        seed = list(context[-DECODE_CONTEXT_TOKENS:])
        if seed and self._tokenizer.decode(seed, skip_special_tokens=True).endswith("\ufffd"):
            seed = []
        self._step: DecodeStream | None = DecodeStream(ids=seed, skip_special_tokens=True)
        self._ids: list[int] = seed
        self._prefix_offset = 0  # the tokens of the last delta begin here (its context)
        self._read_offset = len(seed)  # every token before this one has had its text returned

    def push(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(new_ids)
        step = self._step
        if step is not None:
            try:
                text: str | None = step.step(
                    self._tokenizer, new_ids[0] if len(new_ids) == 1 else list(new_ids)
                )
            except Exception:  # the library's prefix check (a bare Exception): decoded here on
                self._step = None
            else:
                if text is None:
                    return ""
                self._returned()
                return text
        text = self._unread()
        if not text or text.endswith("\ufffd"):
            return ""  # held back: it ends in an incomplete character
        self._returned()
        return text

    def flush(self) -> str:
        """The text held back, if any; what is pushed next decodes without the earlier tokens
        as context (a fresh streaming decoder, at offsets past every token)."""
        text = self._unread() if self._read_offset < len(self._ids) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self._step = DecodeStream(skip_special_tokens=True)
        return text

    def _unread(self) -> str:
        """The text of the tokens from `read_offset` on, decoded after the last delta's tokens."""
        ids, decode = self._ids, self._tokenizer.decode
        prefix: str = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full: str = decode(ids[self._prefix_offset :], skip_special_tokens=True)
        return full[len(prefix) :] if len(full) > len(prefix) else ""

    def _returned(self) -> None:
        """Every token so far had its text returned; the last delta's tokens begin at the old
        read offset."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
