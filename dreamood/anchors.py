"""Class anchors T(y): one token embedding per in-distribution class (DREAM-OOD step 1).

For Stable Diffusion v1.x the anchor of a class is the class name's row of the CLIP ViT-L/14 *input*
token-embedding table (768-d), not the text encoder's output (Du et al., "Dream the Impossible: Outlier
Imagination with Diffusion Models", NeurIPS 2023).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import (
    as_tensor,
    check_choice,
    check_class_names,
    check_finite,
    check_floating,
    check_rank,
)
from dreamood.errors import ArtifactError, ModelNotFoundError
from dreamood.io import load_artifact, save_artifact
from dreamood.pretrained import _how_to_fetch, resolve_pretrained

__all__ = ["SUBWORD_POLICIES", "TokenEmbeddings"]

#: How a class name that the tokenizer splits into several tokens becomes one anchor: ``"mean-norm"`` (the
#: default) averages the sub-token rows and rescales the mean to the mean norm of those rows, ``"mean"`` keeps
#: the plain mean (its norm shrinks: about 0.22-0.28 for Stable Diffusion v1.4 against 0.34-0.42 for single
#: rows), ``"first"`` keeps the first row (what the authors' public code does, with its own injection words).
#: A single-token name gives its row exactly under every policy.
SUBWORD_POLICIES: tuple[str, ...] = ("mean-norm", "mean", "first")


class TokenEmbeddings:
    """The anchors T(y): a named table of one embedding vector per class.

    Args:
        class_names: Class names, indexed by label; non-empty, unique, no empty strings.
        vectors: Anchor vectors of shape ``(C, m)``, one row per class, floating point and finite.
        token_ids: The tokenizer ids each anchor was taken from (one list per class), when known.
        policy: How multi-token names were reduced to one vector (one of :data:`SUBWORD_POLICIES`), or
            ``"given"`` for vectors supplied directly.
        words: The words the anchors were taken from when they are not the class names (e.g. the authors'
            injection words, see :func:`dreamood.data.reference_words`), one per class; ``None`` when the
            class names themselves were tokenised.

    Attributes:
        class_names: The class names.
        vectors: The ``(C, m)`` tensor of anchors.
        token_ids: Per-class token ids (empty lists when unknown).
        policy: The sub-word policy used.
        words: The per-class words tokenised instead of the class names, or ``None``.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        vectors: Tensor,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        policy: str = "given",
        words: Sequence[str] | None = None,
    ) -> None:
        names = check_class_names(class_names)
        table = as_tensor(vectors, "vectors")
        check_rank(table, 2, "vectors", "(num_classes, embedding_dim)")
        check_floating(table, "vectors")
        check_finite(table, "vectors")
        if table.shape[0] != len(names):
            raise ValueError(f"vectors has {table.shape[0]} rows but there are {len(names)} class names")
        if table.shape[1] == 0:
            raise ValueError("vectors has embedding dimension 0")
        ids = [list(map(int, t)) for t in token_ids] if token_ids is not None else [[] for _ in names]
        if len(ids) != len(names):
            raise ValueError(f"token_ids has {len(ids)} entries but there are {len(names)} class names")
        self.class_names: list[str] = names
        self.vectors: Tensor = table.detach()
        self.token_ids: list[list[int]] = ids
        self.policy: str = policy
        if words is not None:
            words = [str(word) for word in words]
            if len(words) != len(names):
                raise ValueError(f"words has {len(words)} entries but there are {len(names)} class names")
        self.words: list[str] | None = words

    @property
    def norms(self) -> Tensor:
        """L2 norm of each anchor, shape ``(C,)``."""
        norms: Tensor = self.vectors.norm(dim=1)
        return norms

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.class_names)

    @property
    def dim(self) -> int:
        """Embedding dimension ``m``."""
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        """Device the vectors live on."""
        return self.vectors.device

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        words = "" if self.words is None else ", words=[...]"
        return f"TokenEmbeddings(num_classes={self.num_classes}, dim={self.dim}, policy={self.policy!r}{words})"

    def to(self, device: DeviceLike = None, dtype: torch.dtype | None = None) -> TokenEmbeddings:
        """Return a copy with the vectors on ``device`` (and in ``dtype`` when given)."""
        return TokenEmbeddings(
            self.class_names,
            self.vectors.to(device=device, dtype=dtype),
            token_ids=self.token_ids,
            policy=self.policy,
            words=self.words,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save as ``path`` (safetensors) plus a JSON sidecar; returns the tensor file's path."""
        metadata: dict[str, Any] = {
            "class_names": self.class_names,
            "token_ids": self.token_ids,
            "policy": self.policy,
        }
        if self.words is not None:
            metadata["words"] = self.words
        return save_artifact(path, {"vectors": self.vectors}, metadata, kind="TokenEmbeddings")

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: DeviceLike = "cpu") -> TokenEmbeddings:
        """Load anchors written by :meth:`save`.

        Raises:
            FileNotFoundError: The file or its sidecar is missing.
            ArtifactError: The files are corrupt or hold another kind of artefact.
        """
        tensors, metadata = load_artifact(path, kind="TokenEmbeddings")
        try:
            return cls(
                metadata["class_names"],
                tensors["vectors"].to(device),
                token_ids=metadata.get("token_ids"),
                policy=str(metadata.get("policy", "given")),
                words=metadata.get("words"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"TokenEmbeddings artefact {path} is inconsistent: {error}") from error

    @classmethod
    @torch.no_grad()
    def from_text_encoder(
        cls,
        tokenizer: Any,
        text_encoder: Any,
        class_names: Sequence[str],
        subword: str = "mean-norm",
        *,
        words: Sequence[str] | None = None,
        check_vocab: bool = True,
        device: DeviceLike = "cpu",
    ) -> TokenEmbeddings:
        """Take each class name's row(s) of a text encoder's input token-embedding table.

        Each name (or each of ``words``) is tokenised without special tokens. A single-token name gives its
        row exactly; a name split into several tokens is reduced by ``subword``.

        The authors' public code takes the first token of its own per-class *injection words* (plurals and
        short forms such as "apples", "chimp", "mower"); ``words=reference_words("cifar100").injection_words,
        subword="first"`` gives exactly those anchors.

        Args:
            tokenizer: A Hugging Face tokenizer (``CLIPTokenizer`` for Stable Diffusion v1.x).
            text_encoder: A model with ``get_input_embeddings()`` returning the token-embedding table
                (``CLIPTextModel``).
            class_names: Class names, indexed by label.
            subword: ``"mean-norm"`` (mean of the sub-token rows rescaled to their mean norm), ``"mean"`` (the
                plain mean, whose norm shrinks) or ``"first"`` (the first sub-token's row).
            words: Per-class words to tokenise instead of the class names (one per class, in label order);
                recorded in the anchors' ``words``.
            check_vocab: Require the tokenizer's vocabulary size to equal the number of rows of the table,
                which catches a tokenizer that silently loaded with the wrong (tiny) vocabulary.
            device: Device of the returned vectors.

        Returns:
            The anchors, in float32 (or the table's dtype when wider), with ``token_ids``, ``policy`` and
            ``words`` recorded.

        Raises:
            ValueError: ``subword`` is unknown, ``words`` has the wrong length or an empty word, the vocabulary
                and the table disagree in size, a name maps to no token or to the unknown token, or a token id
                lies outside the table.
        """
        check_choice(subword, SUBWORD_POLICIES, "subword")
        names = check_class_names(class_names)
        texts = names
        if words is not None:
            if isinstance(words, str):
                raise TypeError(f"words must be a sequence of strings (one per class), not the string {words!r}")
            texts = [str(word) for word in words]
            if len(texts) != len(names):
                raise ValueError(f"words has {len(texts)} entries but there are {len(names)} class names")
            empty = [index for index, word in enumerate(texts) if not word.strip()]
            if empty:
                raise ValueError(f"words[{empty[0]}] is empty; every class needs a word")
        table: Tensor = text_encoder.get_input_embeddings().weight.detach()
        rows = int(table.shape[0])
        if check_vocab and len(tokenizer) != rows:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the text encoder's embedding table has {rows} rows; "
                "the tokenizer probably loaded with the wrong vocabulary (load it with "
                "CLIPTokenizer.from_pretrained(<tokenizer folder>)); pass check_vocab=False if they differ on purpose"
            )
        unknown = getattr(tokenizer, "unk_token_id", None)
        token_ids: list[list[int]] = []
        for name in texts:
            ids = [int(i) for i in tokenizer(name, add_special_tokens=False)["input_ids"]]
            if not ids:
                raise ValueError(f"class name {name!r} maps to no token")
            if unknown is not None and unknown in ids:
                tokens = tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(
                    f"class name {name!r} maps to the unknown token {tokenizer.unk_token!r} (tokens {tokens}); "
                    "the tokenizer's vocabulary does not cover it"
                )
            if max(ids) >= rows:
                raise ValueError(f"class name {name!r} has token id {max(ids)} outside the {rows}-row embedding table")
            token_ids.append(ids)
        dtype = torch.promote_types(table.dtype, torch.float32)
        vectors = []
        for ids in token_ids:
            picked = table[torch.tensor(ids[:1] if subword == "first" else ids, device=table.device)].double()
            # Averaging in float64 keeps the mean independent of the table's storage precision.
            vector = picked.mean(dim=0)
            if subword == "mean-norm" and len(ids) > 1:
                vector = vector * (picked.norm(dim=1).mean() / vector.norm())
            vectors.append(vector.to(dtype))
        return cls(names, torch.stack(vectors).to(device), token_ids=token_ids, policy=subword, words=words)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike[str],
        class_names: Sequence[str],
        subword: str = "mean-norm",
        *,
        words: Sequence[str] | None = None,
        local_files_only: bool = True,
        device: DeviceLike = "cpu",
    ) -> TokenEmbeddings:
        """Load only the tokenizer and text encoder of a pretrained model and take the anchors from them.

        Two layouts are accepted: a Stable Diffusion folder (or Hugging Face model id) holding ``tokenizer/``
        and ``text_encoder/``, and a CLIP text model folder holding the tokenizer files (``vocab.json``,
        ``merges.txt``) beside the model's ``config.json`` and weights.

        Args:
            model_id_or_path: A folder on disk, or a model id such as ``"CompVis/stable-diffusion-v1-4"``
                looked up in the Hugging Face cache.
            class_names: Class names, indexed by label (e.g. ``dreamood.data.CIFAR100_CLASSES``).
            subword: Multi-token policy, one of :data:`SUBWORD_POLICIES` (see :meth:`from_text_encoder`).
            words: Per-class words tokenised instead of the class names (see :meth:`from_text_encoder`).
            local_files_only: Never touch the network. With ``False`` a missing model is downloaded.
            device: Device of the returned vectors.

        Returns:
            The anchors, as :meth:`from_text_encoder` builds them.

        Raises:
            ModelNotFoundError: The model is missing or incomplete (the message names the path, the expected
                layout and how to fetch the model once).
            ValueError: As :meth:`from_text_encoder`.
        """
        check_choice(subword, SUBWORD_POLICIES, "subword")
        tokenizer, text_encoder = _load_tokenizer_and_text_encoder(os.fspath(model_id_or_path), local_files_only)
        return cls.from_text_encoder(tokenizer, text_encoder, class_names, subword, words=words, device=device)

    @classmethod
    def from_text_encoders(
        cls,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[Any],
        class_names: Sequence[str],
        subword: str = "mean",
        *,
        check_vocab: bool = True,
        device: DeviceLike = "cpu",
    ) -> TokenEmbeddings:
        """Anchors of a model with several text encoders: each class's rows of every table, concatenated.

        Stable Diffusion XL conditions on two text encoders (CLIP ViT-L, 768-d, and OpenCLIP ViT-bigG,
        1280-d). Its anchor of a class is ``[T_1(y), T_2(y)]``, the class name's row of the first input
        token-embedding table followed by its row of the second (2048-d); a decoder splits a vector at the
        same widths again and injects each part into its own encoder (see
        :class:`~dreamood.decoding.sdxl.StableDiffusionXLDecoder`). Each part is taken exactly as
        :meth:`from_text_encoder` takes it, with the same ``subword`` policy.

        Args:
            tokenizers: One tokenizer per text encoder, in the model's order.
            text_encoders: The text encoders, in the model's order.
            class_names: Class names, indexed by label.
            subword: Multi-token policy, ``"mean"`` or ``"first"``.
            check_vocab: As in :meth:`from_text_encoder`, for every pair.
            device: Device of the returned vectors.

        Returns:
            The concatenated anchors, with the token ids of the first tokenizer.

        Raises:
            ValueError: The sequences are empty or of different lengths, the tokenizers split a class name into
                different token ids (the parts would not stand for the same tokens), or as
                :meth:`from_text_encoder`.
        """
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError(
                f"give one tokenizer per text encoder (at least one), got {len(tokenizers)} tokenizers and "
                f"{len(text_encoders)} text encoders"
            )
        parts = [
            cls.from_text_encoder(tokenizer, encoder, class_names, subword, check_vocab=check_vocab, device=device)
            for tokenizer, encoder in zip(tokenizers, text_encoders)
        ]
        for index, part in enumerate(parts[1:], start=1):
            for name, first, other in zip(part.class_names, parts[0].token_ids, part.token_ids):
                if first != other:
                    raise ValueError(
                        f"tokenizer {index} splits class name {name!r} into token ids {other} but tokenizer 0 into "
                        f"{first}; the anchor's parts must stand for the same tokens"
                    )
        dtype = parts[0].vectors.dtype
        for part in parts[1:]:
            dtype = torch.promote_types(dtype, part.vectors.dtype)
        vectors = torch.cat([part.vectors.to(dtype) for part in parts], dim=1)
        return cls(parts[0].class_names, vectors, token_ids=parts[0].token_ids, policy=subword)


_LAYOUTS = (
    "either a Stable Diffusion folder with tokenizer/ (vocab.json, merges.txt) and text_encoder/ (config.json, "
    "weights), or a CLIP text model folder with vocab.json, merges.txt, config.json and weights"
)


def _load_tokenizer_and_text_encoder(name: str, local_files_only: bool) -> tuple[Any, Any]:
    """Load a ``CLIPTokenizer`` and ``CLIPTextModel`` from a Stable Diffusion or a CLIP text model layout."""
    from safetensors import SafetensorError

    try:
        root = resolve_pretrained(name, ("tokenizer", "text_encoder"), local_files_only=local_files_only)
        subfolders: tuple[str, str] | None = ("tokenizer", "text_encoder")
    except ModelNotFoundError as sd_error:
        try:
            root = resolve_pretrained(name, (), local_files_only=local_files_only)
        except ModelNotFoundError:
            raise ModelNotFoundError(f"{sd_error} Expected {_LAYOUTS}.") from sd_error
        missing = [f for f in ("vocab.json", "merges.txt") if not (Path(root) / f).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"pretrained model folder {root!r} is incomplete: it has neither tokenizer/ and text_encoder/ nor "
                f"the tokenizer files {', '.join(missing)} beside its config.json. Expected {_LAYOUTS}."
            ) from sd_error
        subfolders = None
    try:
        if subfolders is not None and Path(root).is_dir():
            return _load_pair(str(Path(root) / subfolders[0]), str(Path(root) / subfolders[1]), local_files_only)
        if subfolders is not None:
            # A model id to download: try the Stable Diffusion layout first, then a plain CLIP model.
            try:
                return _load_pair(root, root, local_files_only, subfolders=subfolders)
            except OSError:
                return _load_pair(root, root, local_files_only)
        return _load_pair(root, root, local_files_only)
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        raise ModelNotFoundError(
            f"could not load the tokenizer and text encoder of {name!r} (from {root!r}): {error}. Expected {_LAYOUTS}. "
            f"{_how_to_fetch(name)}"
        ) from error


def _load_pair(
    tokenizer_path: str, encoder_path: str, local_files_only: bool, subfolders: tuple[str, str] | None = None
) -> tuple[Any, Any]:
    # CLIPTokenizer's constructor differs between transformers 4.x and 5.x; from_pretrained(folder) is stable.
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer_kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    encoder_kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if subfolders is not None:
        tokenizer_kwargs["subfolder"], encoder_kwargs["subfolder"] = subfolders
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path, **tokenizer_kwargs)
    text_encoder = CLIPTextModel.from_pretrained(encoder_path, **encoder_kwargs)
    return tokenizer, text_encoder
