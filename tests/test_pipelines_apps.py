"""The task pipelines: question answering over documents, text classification and translation
(fine-tuned with fastlm.finetune through the Trainer), their save/load round trips, their
errors, the metrics (against scikit-learn and sacrebleu) and the CLI commands. Every data set
is generated here; models are tiny and train for a few hundred steps on the CPU."""
import json
import math
import pathlib
import random

import numpy as np
import pytest
import torch

import fastlm
from fastlm import GPT, GPTConfig
from fastlm.checkpoint import CheckpointError
from fastlm.cli import main
from fastlm.finetune import SequenceClassifier, finetune, read_examples
from fastlm.metrics import (accuracy, classification_report, confusion_matrix, corpus_bleu, evaluate_task,
                            format_confusion, precision_recall_f1, tokenize_13a)
from fastlm.pipelines import load_pipeline, pipeline, split_passages

QUIET = dict(progress=False, plot=False, tensorboard=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and so do not fight other processes for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- synthetic data
FILLER = ["the", "a", "of", "table", "river", "green", "walk", "seven", "under", "paper", "cloud", "stone", "fast",
          "blue", "open", "city", "wind", "road", "light", "glass"]
POSITIVE = ["good", "great", "happy", "lovely", "excellent", "bright"]
NEGATIVE = ["bad", "awful", "sad", "horrid", "terrible", "gloomy"]


def sentiment_examples(n, held_out, seed):
    """Two cue words of one polarity amid random filler; the label is the polarity. Cue pairs
    (i, j) with (i + j) % 3 == 0 appear only in the held-out set."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        cues = POSITIVE if label == "pos" else NEGATIVE
        while True:
            i, j = rng.sample(range(len(cues)), 2)
            if ((i + j) % 3 == 0) == held_out:
                break
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 10))]
        for c in (cues[i], cues[j]):
            words.insert(rng.randint(0, len(words)), c)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def cipher_pairs(n_train, n_test, seed=0):
    """A word-for-word substitution cipher over a generated vocabulary, four-word sentences (a
    fixed length keeps the alignment positional, which a tiny model learns in a few hundred
    steps); the test sentences are not in the training set."""
    rng = random.Random(seed)

    def word():
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(1, 2)))

    source = sorted({word() for _ in range(60)})[:16]
    target = []
    while len(target) < 16:
        w = word() + "x"
        if w not in target:
            target.append(w)
    mapping = dict(zip(source, target))

    def pair():
        ws = [rng.choice(source) for _ in range(4)]
        return {"source": " ".join(ws), "target": " ".join(mapping[w] for w in ws)}

    train = [pair() for _ in range(n_train)]
    seen = {p["source"] for p in train}
    test = [p for p in (pair() for _ in range(n_test)) if p["source"] not in seen]
    return train, test, mapping


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("classifier")
    train = _write_jsonl(d / "train.jsonl", sentiment_examples(400, held_out=False, seed=0))
    test = _write_jsonl(d / "test.jsonl", sentiment_examples(100, held_out=True, seed=1))
    summary = finetune("classification", GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32), train, d / "out",
                       vocab_size=400, max_iters=200, lr=1e-3, batch_size=32, eval_interval=50, patience=3, **QUIET)
    return {"dir": d, "train": train, "test": test, "summary": summary}


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("translation")
    train, test, mapping = cipher_pairs(800, 40)
    train_file = _write_jsonl(d / "train.jsonl", train)
    test_file = _write_jsonl(d / "test.jsonl", test)
    summary = finetune("translation", GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=48), train_file,
                       d / "out", vocab_size=400, src_lang="src", tgt_lang="tgt", max_iters=300, lr=3e-3,
                       batch_size=32, eval_interval=100, **QUIET)
    return {"dir": d, "test": test, "test_file": test_file, "mapping": mapping, "summary": summary}


# ----------------------------------------------------------------------------- question answering
ZORBIA = ("Zorbia is a small country in the northern hills. Its people keep sheep and weave wool.\n\n"
          "The capital of Zorbia is Quentar, a walled city on the river Aln.\n\n"
          "Zorbia exports wool, cheese and copper to its neighbours.")
DOCUMENTS = {
    "zorbia.txt": ZORBIA,
    "banking.txt": "A bank lends money. Venture capital funds young firms.\n\nInterest is the price of money.",
    "weather.txt": "Rain falls in the hills in spring.\n\nThe river floods when the snow melts.",
    "cooking.txt": "Bread needs flour, water, salt and yeast.\n\nCheese is made from milk.",
}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    tok = fastlm.Tokenizer.train(list(DOCUMENTS.values()), vocab_size=300)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32,
                  eos_token_id=tok.eot_token)).save_pretrained(d)
    tok.save(d)
    return d


def test_split_passages_at_paragraphs_and_sentences():
    text = "First paragraph.\n\n  Second   paragraph,\nsame one.\n\n\n" + "One sentence here. " * 6 + "\n\n" + "x" * 25
    passages = split_passages(text, max_chars=40)
    assert passages[:2] == ["First paragraph.", "Second paragraph, same one."]
    assert passages[2:5] == ["One sentence here. One sentence here."] * 3
    assert passages[5:] == ["x" * 25]
    assert all(len(p) <= 40 for p in split_passages("word " * 100, max_chars=40))
    assert split_passages("") == []


def test_retrieval_ranks_the_planted_fact_first(lm_dir):
    pipe = pipeline("question-answering", model=lm_dir, documents=DOCUMENTS)
    hits = pipe.retrieve("What is the capital of Zorbia?")
    assert hits[0]["document"] == "zorbia.txt"
    assert "Quentar" in hits[0]["passage"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert {h["document"] for h in hits} <= set(DOCUMENTS)


def test_qa_answers_with_named_sources(lm_dir):
    pipe = pipeline("question-answering", model=lm_dir, documents=DOCUMENTS, max_new_tokens=8)
    out = pipe("What is the capital of Zorbia?")
    assert set(out) == {"answer", "sources", "grounded", "note"}
    assert isinstance(out["answer"], str) and out["grounded"] and out["note"] is None
    assert out["sources"][0]["document"] == "zorbia.txt" and "Quentar" in out["sources"][0]["passage"]
    assert all(set(s) == {"document", "passage", "score"} for s in out["sources"])
    assert len(pipe(["What is the capital of Zorbia?", "How is bread made?"])) == 2


def test_qa_without_documents_says_so(lm_dir):
    out = pipeline("question-answering", model=lm_dir, max_new_tokens=4)("What is the capital of Zorbia?")
    assert out["sources"] == [] and out["grounded"] is False and "model alone" in out["note"]
    # documents that share no word with the question: no passage, and the note says why
    out = pipeline("question-answering", model=lm_dir, documents=["Cats purr."], max_new_tokens=4)("Why rain?")
    assert out["sources"] == [] and not out["grounded"] and "no passage matched" in out["note"]


def test_qa_question_always_fits(lm_dir):
    long_doc = {"zorbia.txt": "The capital of Zorbia is Quentar. " + "Zorbia has hills and sheep and wool. " * 30}
    pipe = pipeline("question-answering", model=lm_dir, documents=long_doc, max_passage_chars=2000, max_new_tokens=16)
    tok, question = pipe.generator.tokenizer, "What is the capital of Zorbia?"
    hits = pipe.retrieve(question)
    assert len(tok.encode(hits[0]["passage"])) > 128  # the passage alone exceeds the context
    prompt, used = pipe.build_prompt(question, hits, max_new_tokens=16)
    q_ids = tok.encode(f"Question: {question}\nAnswer:")
    assert len(prompt) <= 128 - 16 and prompt[-len(q_ids):] == q_ids and used == hits[:1]
    assert pipe(question)["grounded"]
    # the question is never cut: one that cannot fit with the answer's room is an error
    with pytest.raises(ValueError, match="exceeds the model's context"):
        pipe("why " * 120 + "?")
    # when only the question fits, it is asked alone
    k = max(k for k in range(1, 60) if len(tok.encode(f"Question: Zorbia {'why ' * k}\nAnswer:")) <= 128 - 16)
    q = f"Zorbia {'why ' * k}".strip()
    prompt, used = pipe.build_prompt(q, pipe.retrieve(q), max_new_tokens=16)
    assert used == [] and prompt == tok.encode(f"Question: {q}\nAnswer:")


def test_qa_bad_inputs(lm_dir):
    with pytest.raises(ValueError, match="documents is empty"):
        pipeline("question-answering", model=lm_dir, documents=[])
    with pytest.raises(TypeError, match="not a single string"):
        pipeline("question-answering", model=lm_dir, documents="one text")
    with pytest.raises(ValueError, match="no text"):
        pipeline("question-answering", model=lm_dir, documents=["  ", "\n\n"])
    with pytest.raises(ValueError, match="not both"):
        pipeline("question-answering", model=lm_dir, documents=["aa bb"], index=fastlm.features.TfidfIndex(["aa bb"]))
    with pytest.raises(ValueError, match="non-empty string"):
        pipeline("question-answering", model=lm_dir)("  ")
    with pytest.raises(ValueError, match="supports the tasks"):
        pipeline("summarization", model=lm_dir)


def test_qa_with_an_index_and_save_load(lm_dir, tmp_path):
    index = fastlm.features.TfidfIndex(["The capital of Zorbia is Quentar.", "Bread needs flour."],
                                       ids=["atlas", "recipes"])
    pipe = pipeline("question-answering", model=lm_dir, index=index, max_new_tokens=6)
    assert pipe.retrieve("capital of Zorbia")[0]["document"] == "atlas"
    pipe = pipeline("question-answering", model=lm_dir, documents=DOCUMENTS, top_k=2, max_new_tokens=6)
    pipe.save_pretrained(tmp_path / "qa")
    assert {p.name for p in (tmp_path / "qa").iterdir()} >= {"config.json", "index", "model.safetensors",
                                                             "pipeline.json", "tokenizer.json"}
    assert not list((tmp_path / "qa").rglob("*.pkl")) and not list((tmp_path / "qa").rglob("*.bin"))
    again = load_pipeline(tmp_path / "qa")
    assert again.task == "question-answering" and again.top_k == 2
    question = "What is the capital of Zorbia?"
    assert again(question) == pipe(question)
    with pytest.raises(ValueError, match="holds a 'question-answering' pipeline"):
        pipeline("translation", model=tmp_path / "qa")


# ----------------------------------------------------------------------------- classification
def test_classifier_learns_held_out_cue_combinations(classifier_run):
    summary = classifier_run["summary"]
    assert summary["pipeline_dir"] and (summary["out_dir"])
    pipe = load_pipeline(summary["pipeline_dir"])
    assert pipe.task == "text-classification" and pipe.labels == ["neg", "pos"]
    test = read_examples(classifier_run["test"], ("text", "label"))
    predicted = [r[0]["label"] for r in pipe([ex["text"] for ex in test])]
    acc = accuracy([ex["label"] for ex in test], predicted)
    assert acc >= 0.8, f"held-out accuracy {acc:.2f} (chance 0.5)"


def test_classification_pipeline_outputs(classifier_run):
    d = classifier_run["summary"]["pipeline_dir"]
    pipe = pipeline("sentiment-analysis", model=d)
    one = pipe("a great and lovely walk")
    assert len(one) == 1 and set(one[0]) == {"label", "score"} and 0.0 <= one[0]["score"] <= 1.0
    both = pipe("the road was awful and gloomy", top_k=None)
    assert [x["label"] for x in both] in (["neg", "pos"], ["pos", "neg"])
    assert math.isclose(sum(x["score"] for x in both), 1.0, rel_tol=1e-5) and both[0]["score"] >= both[1]["score"]
    batch = pipe(["a great walk", "a sad road"], top_k=2)
    assert len(batch) == 2 and all(len(r) == 2 for r in batch)
    with pytest.raises(ValueError, match="top_k"):
        pipe("x y", top_k=0)
    with pytest.raises(ValueError, match="empty"):
        pipe("")
    with pytest.raises(TypeError, match="classification head"):
        pipeline("text-classification", model=GPT(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1,
                                                             n_embd=8)), tokenizer=pipe.tokenizer)


def test_classification_save_load_round_trip(classifier_run, tmp_path):
    pipe = pipeline("text-classification", model=classifier_run["summary"]["pipeline_dir"])
    texts = ["a great walk under the blue cloud", "terrible sad road", "seven stones"]
    pipe.save_pretrained(tmp_path / "clf")
    again = pipeline("text-classification", model=tmp_path / "clf")
    assert again(texts, top_k=None) == pipe(texts, top_k=None)
    model = again.model
    assert isinstance(model, SequenceClassifier) and model.pooling == "mean"
    # the in-memory task model serves as well as a directory
    live = pipeline("text-classification", model=classifier_run["summary"]["task_model"], tokenizer=again.tokenizer)
    assert live.labels == again.labels


def test_last_token_pooling_and_head_mismatch(classifier_run, tmp_path):
    d = tmp_path / "last"
    summary = finetune("classification", GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32),
                       classifier_run["train"], d, vocab_size=300, pooling="last", max_iters=4, eval_interval=4,
                       **QUIET)
    best = pathlib.Path(summary["pipeline_dir"])
    cfg = json.loads((best / "pipeline.json").read_text())
    assert cfg["pooling"] == "last"
    assert pipeline("text-classification", model=best)("good day")[0]["label"] in ("neg", "pos")
    cfg["labels"] = ["neg", "pos", "meh"]
    (best / "pipeline.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="the head has 2 outputs but pipeline.json lists 3 labels"):
        load_pipeline(best)


def test_finetune_bad_inputs(tmp_path):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "so so", "label": "meh"}]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 3: label 'meh' is not one of the labels \['pos', 'neg'\]"):
        finetune("classification", cfg, data, tmp_path / "o", labels=["pos", "neg"], max_iters=1, **QUIET)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: missing field 'label'"):
        finetune("classification", cfg, bad, tmp_path / "o", max_iters=1, **QUIET)
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a" "target": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_examples(bad, ("source", "target"))
    bad.write_text('{"source": "a", "target": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: field 'target' must be a string"):
        read_examples(bad, ("source", "target"))
    with pytest.raises(ValueError, match="task must be one of"):
        finetune("summarization", cfg, data, tmp_path / "o")
    one_label = _write_jsonl(tmp_path / "one.jsonl", [{"text": "a b", "label": "x"}] * 3)
    with pytest.raises(ValueError, match="at least 2 labels"):
        finetune("classification", cfg, one_label, tmp_path / "o", max_iters=1, **QUIET)


# ----------------------------------------------------------------------------- translation
def test_translation_reaches_bleu_above_50(translation_run):
    pipe = load_pipeline(translation_run["summary"]["pipeline_dir"])
    assert pipe.task == "translation" and (pipe.src_lang, pipe.tgt_lang) == ("src", "tgt")
    tok = pipe.generator.tokenizer
    assert all(len(tok.encode(" " + w)) == 1 for pair in translation_run["mapping"].items() for w in pair)
    test = translation_run["test"]
    hyps = [r["translation_text"] for r in pipe([ex["source"] for ex in test])]
    bleu = corpus_bleu(hyps, [ex["target"] for ex in test])
    assert bleu > 50, f"BLEU {bleu:.1f} on held-out sentences; e.g. {hyps[:2]} for {[ex['target'] for ex in test[:2]]}"


def test_translation_loss_is_on_target_tokens_only(translation_run):
    from fastlm.finetune import ExampleData, translation_prompt

    tok = load_pipeline(translation_run["summary"]["pipeline_dir"]).generator.tokenizer
    examples = [{"source": "ka lo", "target": "zux pix", "line": 1}, {"source": "ka", "target": "mux", "line": 2}]
    data = ExampleData.for_translation(examples, tok, "src", "tgt", block_size=48, val_fraction=0.0)
    assert data.has_batches("train", 48) and not data.has_batches("val", 48)
    # a few short examples are a val split, however few tokens they hold
    assert ExampleData.for_translation(examples, tok, "src", "tgt", 48, val_fraction=0.5).has_batches("val", 48)
    x, y = data.batch("train", 8, 48, np.random.default_rng(0))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        ex = examples[0] if tok.decode(row_x).startswith("src: ka lo") else examples[1]
        prompt = tok.encode(translation_prompt(ex["source"], "src", "tgt"))
        target = tok.encode(" " + ex["target"]) + [tok.eot_token]
        n = len(prompt) + len(target) - 1
        assert row_x[:n] == (prompt + target)[:-1]
        assert row_y[:n] == [-100] * (len(prompt) - 1) + target  # the prompt's targets are ignored
        assert row_y[n:] == [-100] * (len(row_y) - n)  # and so is the padding
    assert x.shape[1] == max(len(tok.encode(translation_prompt(ex["source"], "src", "tgt")))
                             + len(tok.encode(" " + ex["target"])) for ex in examples)


def test_translation_save_load_and_errors(translation_run, tmp_path):
    pipe = load_pipeline(translation_run["summary"]["pipeline_dir"])
    sources = [ex["source"] for ex in translation_run["test"][:5]]
    pipe.save_pretrained(tmp_path / "tr")
    again = pipeline("translation", model=tmp_path / "tr")
    assert again(sources) == pipe(sources)
    assert again(sources[0]) == pipe(sources[:1])
    assert pipeline("translation", model=tmp_path / "tr", batch_size=2)(sources) == again(sources)
    with pytest.raises(ValueError, match="translates src to tgt"):
        pipeline("translation", model=tmp_path / "tr", tgt_lang="fr")
    with pytest.raises(ValueError, match="needs src_lang= and tgt_lang="):
        pipeline("translation", model=pipe.generator.model, tokenizer=pipe.generator.tokenizer)
    with pytest.raises(ValueError, match="no room for the translation"):
        again(" ".join(sources * 10))


# ----------------------------------------------------------------------------- metrics
def test_classification_metrics_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for labels in (["a", "b"], ["cat", "dog", "eel", "fox"]):
        y_true = list(rng.choice(labels, 60))
        y_pred = [t if rng.random() < 0.6 else rng.choice(labels) for t in y_true]
        y_pred[:3] = [labels[0]] * 3
        assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred))
        assert (confusion_matrix(y_true, y_pred) == sk.confusion_matrix(y_true, y_pred, labels=labels)).all()
        p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        ours = precision_recall_f1(y_true, y_pred)
        assert list(ours) == labels
        for i, label in enumerate(labels):
            assert ours[label]["precision"] == pytest.approx(p[i])
            assert ours[label]["recall"] == pytest.approx(r[i])
            assert ours[label]["f1"] == pytest.approx(f[i])
            assert ours[label]["support"] == s[i]
        report = classification_report(y_true, y_pred)
        assert report["macro_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro", zero_division=0))
    # a label never predicted: precision 0 (scikit-learn's zero_division=0), and labels given in order
    ours = precision_recall_f1(["x", "y", "y"], ["y", "y", "y"], labels=["y", "x"])
    assert list(ours) == ["y", "x"] and ours["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    table = format_confusion([[3, 1], [0, 2]], ["pos", "neg"])
    assert table.splitlines()[1].split() == ["pos", "3", "1"] and "pred" in table.splitlines()[0]
    with pytest.raises(ValueError, match="no labels"):
        accuracy([], [])


def test_bleu_hand_computed_values():
    # 1- to 4-gram matches 5/6, 3/5, 1/4 and 0/3 (exp smoothing: 1/(2*3)); same length, no penalty
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"], use_sacrebleu=False) == pytest.approx(
        100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    # every n-gram matches, 5 tokens against 6: the brevity penalty alone
    assert corpus_bleu(["the cat sat on the"], ["the cat sat on the mat"], use_sacrebleu=False) == pytest.approx(
        100 * math.exp(1 - 6 / 5))
    assert corpus_bleu(["a b c d", "e f g h"], ["a b c d", "e f g h"], use_sacrebleu=False) == pytest.approx(100)
    assert corpus_bleu(["the cat"], ["the cat sat on the mat"], use_sacrebleu=False) == 0.0  # no 3-grams at all
    assert corpus_bleu(["x y z w"], ["a b c d"], use_sacrebleu=False) == 0.0
    # two references: clipping by the larger count, closest length for the penalty
    two = corpus_bleu(["the the cat sat"], [["the cat sat"], ["the the cat sat down"]], use_sacrebleu=False)
    assert two == pytest.approx(100.0)
    assert tokenize_13a("Hello, world! It's 3.5-4 km.") == "Hello , world ! It's 3.5 - 4 km ."
    assert tokenize_13a("A &amp; B (x+y)/2") == "A & B ( x + y ) / 2"
    with pytest.raises(ValueError, match="one string per hypothesis"):
        corpus_bleu(["a", "b"], ["a"])


def test_builtin_bleu_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "a", "ran", "big", "red", "3.5", "km", ",", ".", "(", ")", "-"]
    corpora = [
        (["The cat sat on the mat.", "It's 3-4 km, (roughly)!"], [["The cat is on the mat.", "It is 3-4 km roughly."]]),
        (["hello world"], [["hello there world"], ["hello world !"]]),
        (["a b", "c d e f g"], [["a b c", "c d e f g h i"]]),
    ]
    for _ in range(5):
        hyps = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(8)]
        refs = [[" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(8)]
                for _ in range(rng.randint(1, 3))]
        corpora.append((hyps, refs))
    corpora.append(([h.split(" ", 1)[-1] for h in corpora[-1][0]], corpora[-1][1]))
    for hyps, refs in corpora:
        expected = sacrebleu.corpus_bleu(hyps, refs).score
        assert corpus_bleu(hyps, refs, use_sacrebleu=False) == pytest.approx(expected, abs=1e-9)
        assert corpus_bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)


def test_evaluate_task_classification(classifier_run, tmp_path, capsys):
    best = classifier_run["summary"]["pipeline_dir"]
    steps = sorted((classifier_run["dir"] / "out" / "checkpoints").iterdir())
    result = evaluate_task("classification", [best, steps[-1]], classifier_run["test"],
                           json_out=tmp_path / "r.json", png_out=tmp_path / "cm.png")
    assert result["task"] == "classification" and result["n"] == 100 and len(result["models"]) == 2
    first = result["models"][0]
    assert first["accuracy"] >= 0.8 and set(first["per_class"]) == {"neg", "pos"}
    assert np.array(first["confusion_matrix"]).sum() == 100
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "confusion matrix" in printed and "precision" in printed
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "good walk", "label": "pos"}, {"text": "x", "label": "meh"}])
    with pytest.raises(ValueError, match="line 2: label 'meh' is not one of the model's labels"):
        evaluate_task("classification", best, bad)
    with pytest.raises(ValueError, match="not a translation model"):
        evaluate_task("translation", best, bad)
    # the same through `fastlm eval --task classification`
    capsys.readouterr()
    assert main(["eval", str(best), "--data", str(classifier_run["test"]), "--task", "classification",
                 "--json", str(tmp_path / "cli.json"), "--png", str(tmp_path / "cli.png")]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["models"][0]["accuracy"] == first["accuracy"]
    assert "confusion matrix" in capsys.readouterr().out


def test_evaluate_task_translation(translation_run, tmp_path, capsys):
    result = evaluate_task("translation", str(translation_run["summary"]["pipeline_dir"]),
                           translation_run["test_file"], json_out=tmp_path / "t.json", png_out=tmp_path / "bleu.png")
    assert result["models"][0]["bleu"] > 50 and result["n"] == len(translation_run["test"])
    assert "bleu" in capsys.readouterr().out
    assert (tmp_path / "bleu.png").is_file() and json.loads((tmp_path / "t.json").read_text())["task"] == "translation"


# ----------------------------------------------------------------------------- CLI
def test_cli_finetune_classify_translate_qa(tmp_path, lm_dir, capsys):
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 48}))
    cls_data = _write_jsonl(tmp_path / "labeled.jsonl", sentiment_examples(60, held_out=False, seed=3))
    assert main(["finetune", "--task", "classification", "--model", str(cfg), "--data", str(cls_data),
                 "--out", str(tmp_path / "clf"), "--steps", "10", "--eval-interval", "5", "--batch-size", "8",
                 "--lr", "1e-3", "--vocab-size", "300", "--pooling", "last", "--no-progress"]) == 0
    assert "pipeline:" in capsys.readouterr().out
    best = tmp_path / "clf" / "best"
    assert json.loads((best / "pipeline.json").read_text())["pooling"] == "last"
    assert main(["classify", "--model", str(best), "--text", "a great walk", "--text", "awful", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and {r["label"] for r in json.loads(lines[0])} == {"neg", "pos"}

    pairs, _, _ = cipher_pairs(40, 0)
    tr_data = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert main(["finetune", "--task", "translation", "--model", str(cfg), "--data", str(tr_data),
                 "--out", str(tmp_path / "tr"), "--steps", "6", "--eval-interval", "3", "--src-lang", "en",
                 "--tgt-lang", "xx", "--vocab-size", "300", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["translate", "--model", str(tmp_path / "tr" / "best"), "--text", pairs[0]["source"],
                 "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCUMENTS.items():
        (docs / name).write_text(text, encoding="utf-8")
    assert main(["qa", "--model", str(lm_dir), "--documents", str(docs), "--question",
                 "What is the capital of Zorbia?", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["grounded"], out
    assert out["sources"][0]["document"].endswith("zorbia.txt")
    assert main(["qa", "--model", str(lm_dir), "--question", "Why?", "--max-new-tokens", "2"]) == 0
    assert "model alone" in capsys.readouterr().err
    # errors are reported, not raised
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}])
    assert main(["finetune", "--task", "classification", "--model", str(cfg), "--data", str(bad),
                 "--out", str(tmp_path / "x")]) == 2
    assert "line 1: missing field 'label'" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path / "tr" / "best"), "--text", "a"]) == 2
    assert "holds a 'translation' pipeline" in capsys.readouterr().err
