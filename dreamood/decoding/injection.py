"""Token-embedding injection: a sampled vector takes the place of a class name inside a prompt.

DREAM-OOD (Du et al., NeurIPS 2023, Eq. 6) decodes an embedding ``v`` by writing the prompt
``"A high-quality photo of a <class>"``, replacing the class name's tokens by one slot, and giving that slot
the *input* token embedding ``v`` instead of a row of the text encoder's embedding table. Everything else in
the text encoder (positions, attention, the causal mask, the end-of-text pooling) runs unchanged.

The prompt's token ids are built here, padded exactly as diffusers' Stable Diffusion pipelines pad them
(``"max_length"`` to ``tokenizer.model_max_length``). The vector is swapped in by a forward hook on
``text_encoder.get_input_embeddings()``, so no private text-encoder internals are touched; the hook exists only
while the text encoder runs.

Two injection modes (:data:`INJECTION_MODES`):

- ``"span"`` (:func:`build_injection_prompts`, the default): the class name's whole token span collapses into
  one slot that takes the vector.
- ``"token"`` (:func:`build_token_prompts`): the prompt is tokenised as it is, and *every* occurrence of one
  chosen token id takes the vector, the name's other sub-tokens stay. This is what the authors' public code
  does by overwriting that token's row of the embedding table, and it gives the same conditioning bit for bit.
  A prompt in which the token does not occur is refused (the authors' code silently renders the plain prompt,
  e.g. for CIFAR-100's "chimpanzee", whose injection word "chimp" is another token).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "INJECTION_MODES",
    "PromptTokens",
    "build_injection_prompts",
    "build_token_prompts",
    "encode_prompt_tokens",
    "inject_token_embeddings",
    "split_template",
    "tokenize_prompts",
]


#: How a vector goes into its prompt: ``"span"`` replaces the class name's token span by one slot, ``"token"``
#: replaces every occurrence of one token id (the authors' vocabulary-row overwrite).
INJECTION_MODES: tuple[str, ...] = ("span", "token")


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of prompts, padded to the text encoder's window, with one injection slot per prompt.

    Attributes:
        prompts: The prompt texts with the class name written in (what the slot stands for).
        input_ids: ``(N, L)`` long tensor, ``L = tokenizer.model_max_length``. In each row the class name's
            token span is replaced by a single token (the span's first), which the injected vector overrides.
        attention_mask: ``(N, L)`` long tensor, 1 on real tokens and 0 on padding.
        slots: ``(N,)`` long tensor, the position of the slot in each row (the first one in ``"token"`` mode).
        span_lengths: Number of tokens the class name occupied in each plain prompt.
        slot_mask: ``(N, L)`` bool tensor marking every position that takes the vector, or ``None`` when each
            row has the single slot ``slots`` (``"span"`` mode).
    """

    prompts: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    slots: Tensor
    span_lengths: list[int]
    slot_mask: Tensor | None = None


def split_template(template: str) -> tuple[str, str]:
    """Split a prompt template at its single ``{}`` placeholder.

    Args:
        template: A prompt with exactly one ``{}`` where the class name goes, e.g.
            ``"A high-quality photo of a {}"``. Other braces are kept as literal text.

    Returns:
        The text before and the text after the placeholder.

    Raises:
        TypeError: ``template`` is not a string.
        ValueError: ``template`` does not contain exactly one ``{}``.
    """
    if not isinstance(template, str):
        raise TypeError(f"prompt_template must be a string, got {type(template).__name__}")
    count = template.count("{}")
    if count != 1:
        raise ValueError(
            f"prompt_template must contain exactly one '{{}}' for the class name, got {count}: {template!r}"
        )
    prefix, suffix = template.split("{}")
    return prefix, suffix


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=special, truncation=False).input_ids]


def _check_window(length: int, window: int, prompt: str, what: str) -> None:
    if length > window:
        raise ValueError(
            f"{what} {prompt!r} is {length} tokens long (with start/end tokens), longer than the text encoder's "
            f"window of {window} tokens; shorten the prompt template or the class name"
        )


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], *, what: str = "prompt") -> tuple[Tensor, Tensor]:
    """Tokenise whole prompts exactly as diffusers' Stable Diffusion pipelines do, but never truncate.

    Args:
        tokenizer: A Hugging Face (CLIP) tokenizer.
        prompts: The prompt texts.
        what: How the prompts are called in error messages.

    Returns:
        ``input_ids`` and ``attention_mask``, both ``(N, tokenizer.model_max_length)`` long tensors.

    Raises:
        ValueError: A prompt is longer than ``tokenizer.model_max_length`` tokens.
    """
    window = int(tokenizer.model_max_length)
    texts = list(prompts)
    for text in texts:
        _check_window(len(_ids(tokenizer, text, special=True)), window, text, what)
    encoded = tokenizer(texts, padding="max_length", max_length=window, truncation=True, return_tensors="pt")
    return encoded.input_ids.long(), encoded.attention_mask.long()


def _templates(template: str | Sequence[str], count: int) -> list[str]:
    """One template per class: ``template`` repeated, or the given per-class list."""
    if isinstance(template, str):
        return [template] * count
    templates = list(template)
    if len(templates) != count:
        raise ValueError(f"prompt_template has {len(templates)} per-class templates but there are {count} classes")
    return templates


def build_injection_prompts(tokenizer: Any, template: str | Sequence[str], class_names: Sequence[str]) -> PromptTokens:
    """Build each class's prompt ids with the class name's token span replaced by one injection slot.

    The prompt (the template with the name written in) is tokenised whole; the class name must appear in it as
    exactly the tokens it has on its own, right after the template's prefix (otherwise the vector would be
    injected in the wrong place, or nowhere). For a single-token name the ids equal the plain prompt's ids.

    Args:
        tokenizer: A Hugging Face (CLIP) tokenizer.
        template: Prompt template with one ``{}`` (see :func:`split_template`), or one template per class.
        class_names: Names (the words written into the prompts) of the classes, indexed by label.

    Returns:
        The padded ids, attention masks and slot positions, one row per class.

    Raises:
        ValueError: The template is malformed, a class name tokenises to nothing or is not a separate token
            span inside the prompt (e.g. the template glues it to a neighbouring word), or a prompt is longer
            than ``tokenizer.model_max_length``.
    """
    names = list(class_names)
    templates = _templates(template, len(names))
    window = int(tokenizer.model_max_length)
    prompts: list[str] = []
    rows: list[list[int]] = []
    slots: list[int] = []
    spans: list[int] = []
    for name, text in zip(names, templates):
        prefix, suffix = split_template(text)
        prefix_ids = _ids(tokenizer, prefix, special=False)
        prompt = prefix + name + suffix
        name_ids = _ids(tokenizer, name, special=False)
        if not name_ids:
            raise ValueError(f"class name {name!r} tokenises to no tokens")
        body = _ids(tokenizer, prompt, special=False)
        full = _ids(tokenizer, prompt, special=True)
        lead = next((i for i in range(len(full) - len(body) + 1) if full[i : i + len(body)] == body), None)
        start = len(prefix_ids)
        found = body[:start] == prefix_ids and body[start : start + len(name_ids)] == name_ids
        if lead is None or not found:
            raise ValueError(
                f"class name {name!r} does not appear as its own tokens in the prompt {prompt!r} "
                f"(tokens {name_ids} expected at position {start} of {body}); the vector would have no slot to go "
                "to. Put the placeholder between spaces or punctuation in prompt_template"
            )
        slot = lead + start
        row = full[: slot + 1] + full[slot + len(name_ids) :]
        _check_window(len(row), window, prompt, "prompt")
        prompts.append(prompt)
        rows.append(row)
        slots.append(slot)
        spans.append(len(name_ids))
    padded = tokenizer.pad({"input_ids": rows}, padding="max_length", max_length=window, return_tensors="pt")
    return PromptTokens(
        prompts=prompts,
        input_ids=padded["input_ids"].long(),
        attention_mask=padded["attention_mask"].long(),
        slots=torch.tensor(slots, dtype=torch.long),
        span_lengths=spans,
    )


def build_token_prompts(
    tokenizer: Any,
    template: str | Sequence[str],
    prompt_words: Sequence[str],
    token_ids: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
) -> PromptTokens:
    """Build each class's plain prompt ids and mark every occurrence of its injected token (``"token"`` mode).

    The prompt is tokenised as it is (the ids equal the plain prompt's ids), and each position holding
    ``token_ids[y]`` takes the vector. This equals overwriting that token's row of the embedding table, as the
    authors' code does.

    Args:
        tokenizer: A Hugging Face (CLIP) tokenizer.
        template: Prompt template with one ``{}``, or one template per class.
        prompt_words: The words written into the templates, indexed by label.
        token_ids: Per class, the token id replaced by the vector (e.g. the first token of the class's
            injection word).
        class_names: Names used in error messages (``prompt_words`` when ``None``).

    Returns:
        The padded ids, attention masks, first slot positions and the mask of every slot, one row per class.

    Raises:
        ValueError: The template is malformed, the lists differ in length, a prompt is longer than the text
            encoder's window, or a class's token does not occur in its prompt (the vector would go nowhere).
    """
    words = list(prompt_words)
    ids = [int(i) for i in token_ids]
    names = list(class_names) if class_names is not None else words
    templates = _templates(template, len(words))
    if not len(ids) == len(names) == len(words):
        raise ValueError(
            f"prompt_words ({len(words)}), token ids ({len(ids)}) and class names ({len(names)}) differ in length"
        )
    prompts = []
    for text, word in zip(templates, words):
        prefix, suffix = split_template(text)
        prompts.append(prefix + word + suffix)
    input_ids, attention_mask = tokenize_prompts(tokenizer, prompts)
    mask = input_ids == torch.tensor(ids, dtype=torch.long)[:, None]
    mask &= attention_mask.bool()
    for row, (name, prompt, token) in enumerate(zip(names, prompts, ids)):
        if not bool(mask[row].any()):
            tokens = tokenizer.convert_ids_to_tokens(_ids(tokenizer, prompt, special=False))
            raise ValueError(
                f"class {row} ({name!r}): the injected token {token} "
                f"({tokenizer.convert_ids_to_tokens([token])[0]!r}) does not occur in its prompt {prompt!r} "
                f"(tokens {tokens}); the vector would not be injected at all. Use a prompt word that contains "
                "the token, or the 'span' injection mode"
            )
    return PromptTokens(
        prompts=prompts,
        input_ids=input_ids,
        attention_mask=attention_mask,
        slots=mask.long().argmax(dim=1),
        span_lengths=[1] * len(prompts),
        slot_mask=mask,
    )


@contextmanager
def inject_token_embeddings(
    embedding: nn.Module, vectors: Tensor, slots: Tensor, slot_mask: Tensor | None = None
) -> Iterator[None]:
    """Within the block, the output of ``embedding`` has row ``i``'s slot ``slots[i]`` replaced by ``vectors[i]``.

    With ``slot_mask``, every position ``j`` with ``slot_mask[i, j]`` is replaced instead.

    A forward hook on the token-embedding module does the swap; it is removed when the block exits, also when
    the block raises.

    Args:
        embedding: The text encoder's input token-embedding module (``text_encoder.get_input_embeddings()``).
        vectors: ``(B, m)`` vectors, one per batch element of the next forward passes.
        slots: ``(B,)`` positions at which to put them.
        slot_mask: ``(B, L)`` bool mask of the positions to replace (``"token"`` mode), or ``None``.

    Yields:
        Nothing; run the text encoder inside the block.

    Raises:
        RuntimeError: Inside the block, the module is called on a batch whose size or width does not match.
    """
    count = int(vectors.shape[0])

    def swap(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if output.dim() != 3 or output.shape[0] != count or output.shape[2] != vectors.shape[1]:
            raise RuntimeError(
                f"token-embedding output of shape {tuple(output.shape)} does not match {count} injected vectors "
                f"of dimension {vectors.shape[1]}"
            )
        values = vectors.to(device=output.device, dtype=output.dtype)
        if slot_mask is not None:
            return torch.where(slot_mask.to(output.device)[:, :, None], values[:, None, :], output)
        rows = torch.arange(count, device=output.device)
        patched = output.clone()
        patched[rows, slots.to(output.device)] = values
        return patched

    handle = embedding.register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()


def encode_prompt_tokens(
    text_encoder: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    vectors: Tensor | None = None,
    slots: Tensor | None = None,
    slot_mask: Tensor | None = None,
) -> Tensor:
    """Run the text encoder on prompt ids, optionally injecting one vector per row, as diffusers does.

    The attention mask is passed only when the text encoder's config asks for it (``use_attention_mask``),
    as in diffusers' Stable Diffusion pipelines.

    Args:
        text_encoder: A Hugging Face text encoder (``CLIPTextModel``).
        input_ids: ``(B, L)`` token ids.
        attention_mask: ``(B, L)`` attention mask.
        vectors: ``(B, m)`` vectors to inject, or ``None`` for the plain prompts.
        slots: ``(B,)`` slot positions; required with ``vectors``.
        slot_mask: ``(B, L)`` mask of every position that takes the vector (``"token"`` mode), or ``None``.

    Returns:
        The last hidden state ``(B, L, d)`` (the pipeline's ``prompt_embeds``).

    Raises:
        ValueError: ``vectors`` is given without ``slots``.
    """
    device = text_encoder.device
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    mask = attention_mask.to(device) if use_mask else None
    with torch.no_grad():
        if vectors is None:
            hidden: Tensor = text_encoder(input_ids.to(device), attention_mask=mask)[0]
            return hidden
        if slots is None:
            raise ValueError("slots are required when vectors are injected")
        with inject_token_embeddings(text_encoder.get_input_embeddings(), vectors, slots, slot_mask):
            hidden = text_encoder(input_ids.to(device), attention_mask=mask)[0]
    return hidden
