"""The lm-evaluation-harness adapter (``fastlm.harness.FastLM``, model name "fastlm") against
lm-eval's own Hugging Face model on the same GPT-2 weights and tokenizer: the three request
kinds directly, then a whole evaluation of local task files (nothing downloaded)."""
import json
import math
import os

import pytest
import torch

# Local task files only: the datasets library must not look for anything online.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'fastlm[eval]')")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nThe cat sat on mat {i}.\n" for i in range(60))


def _rolling_task(folder, name, metrics):
    """A local lm-eval task file: rolling log-likelihood of the texts in folder/text.jsonl."""
    listed = "".join(f"  - metric: {m}\n" for m in metrics)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'text.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
{listed}""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fastlm import Tokenizer

    d = tmp_path_factory.mktemp("harness")
    tok = Tokenizer.train([TEXT], 300)
    tok.save(d)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.n_vocab, n_positions=48, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tok.eot_token, eos_token_id=tok.eot_token))
    hf.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(checkpoint):
    import fastlm.harness  # noqa: F401  (registers "fastlm")
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    ours = get_model("fastlm").create_from_arg_string(f"pretrained={checkpoint}", {"batch_size": 3})
    ref = HFLM(pretrained=str(checkpoint), batch_size=3, device="cpu")
    return ours, ref


def _instances(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("t", i, 1))
            for i, args in enumerate(args_list)]


def test_requests_match_lm_evals_hf_model(models):
    ours, ref = models
    ll = [("The cat", " sat"), ("", "def f1(x):"), ("def f3(x):\n   ", " return x * 3"),
          (TEXT[:400], " on mat 9."), ("The", " cat sat on mat 12.\n")]
    got, want = ours.loglikelihood(_instances("loglikelihood", ll)), ref.loglikelihood(_instances("loglikelihood", ll))
    for (a, ga), (b, gb) in zip(got, want):
        assert abs(a - b) <= 1e-4 * abs(b) and ga == gb, (a, b)
    texts = [(TEXT[:30],), (TEXT[:700],), ("x",)]
    got = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    want = ref.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-4 * abs(b), (a, b)
    gen = [("def f2(x):\n", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
           ("The cat", {"until": ["."], "max_gen_toks": 6})]
    assert ours.generate_until(_instances("generate_until", gen)) == ref.generate_until(_instances("generate_until", gen))


def test_simple_evaluate_on_local_tasks(models, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"q": f"def f{i}(x):\n    return x *", "choices": [f" {i}", f" {i + 1}", " q"], "label": 0} for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": TEXT[i:i + 300]}) + "\n" for i in (0, 500, 1000)))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    _rolling_task(tmp_path, "tiny_ppl", ["word_perplexity", "bits_per_byte"])
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    ours, ref = models
    res = {}
    for name, lm in (("ours", ours), ("ref", ref)):
        out = simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_ppl"], task_manager=tm)
        res[name] = out["results"]
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_ppl", "word_perplexity,none"), ("tiny_ppl", "bits_per_byte,none")):
        a, b = res["ours"][task][metric], res["ref"][task][metric]
        assert math.isfinite(a) and abs(a - b) <= 1e-4 * abs(b), (task, metric, a, b)


def test_lm_eval_command_line_finds_the_model(checkpoint, tmp_path):
    import subprocess
    import sys

    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": TEXT[i:i + 200]}) + "\n" for i in (0, 300)))
    _rolling_task(tmp_path, "cli_ppl", ["bits_per_byte"])
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "fastlm.harness", "--model", "fastlm", "--model_args",
                        f"pretrained={checkpoint}", "--tasks", "cli_ppl", "--include_path", str(tmp_path),
                        "--batch_size", "2", "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "cli_ppl" in r.stdout and "bits_per_byte" in r.stdout


def test_generate_until_batched_equals_one_at_a_time(checkpoint, monkeypatch, capsys):
    """Requests grouped by their options and generated batch_size at a time give the answers
    of one generate call per request (greedy), stop strings applied per request, in order."""
    import fastlm.evaluation.harness as harness
    from fastlm import Tokenizer
    from fastlm.generation import generate
    from fastlm.models import load_model

    model, tok = load_model(checkpoint), Tokenizer.load(checkpoint)
    prompts = [TEXT[37 * i:37 * i + 9 + 11 * i] for i in range(8)]

    def one_at_a_time(context, kw):
        ids = tok.encode_ordinary(context)[-(48 - kw["max_gen_toks"]):]
        text = generate(model, ids, max_new_tokens=kw["max_gen_toks"], stop=kw["until"] or None, tokenizer=tok,
                        return_dict_in_generate=True).texts[0]
        for s in kw["until"]:
            text = text.split(s)[0]
        return text

    free = [one_at_a_time(p, {"until": [], "max_gen_toks": 10}) for p in prompts]
    assert all(len(f) >= 4 for f in free) and len(set(free)) > 1  # answers that differ: an order mix-up shows
    # Stop strings from inside some answers (so those answers are cut), others that never occur.
    requests = []
    for i, p in enumerate(prompts):
        kind = i % 3
        kw = ({"until": [free[i][2:4]], "max_gen_toks": 10} if kind == 0 else
              {"until": ["\u2603"], "max_gen_toks": 6, "do_sample": False} if kind == 1 else
              {"until": "\u2603", "max_gen_toks": 10, "temperature": 0.0})
        requests.append((p, kw))
    want = [one_at_a_time(p, {**kw, "until": [kw["until"]] if isinstance(kw["until"], str) else kw["until"]})
            for p, kw in requests]
    assert [len(w) < len(f) for w, f in zip(want[::3], free[::3])] == [True] * len(want[::3])

    calls = []
    real = harness.generate
    monkeypatch.setattr(harness, "generate", lambda m, ids, **kw: calls.append(len(ids)) or real(m, ids, **kw))
    ours = harness.FastLM(model=model, tokenizer=tok, batch_size=2)
    got = ours.generate_until(_instances("generate_until", requests))
    assert got == want
    # Requests of equal options went together, at most batch_size of them a call.
    assert sum(calls) == len(requests) and max(calls) == 2 and calls.count(2) >= 2
    assert capsys.readouterr().err == ""  # no bar: stderr is not a terminal


def test_adapter_progress_bars(checkpoint, monkeypatch, capsys):
    import fastlm.evaluation.harness as harness
    from fastlm import _progress

    monkeypatch.setitem(_progress.BAR_DEFAULTS, "mininterval", 0)  # every update drawn, the last one kept
    monkeypatch.setitem(_progress.BAR_DEFAULTS, "leave", True)
    ours = harness.FastLM(pretrained=str(checkpoint), batch_size=2, device="cpu")
    reqs = _instances("generate_until", [(TEXT[:20], {"until": ["\n"], "max_gen_toks": 3})] * 3)
    ll = _instances("loglikelihood", [("The cat", " sat")] * 5)
    monkeypatch.setenv("FASTLM_PROGRESS", "1")  # as on a terminal
    ours.generate_until(reqs)
    ours.loglikelihood(ll)
    err = capsys.readouterr().err
    assert "generate_until" in err and "3/3" in err and "scoring" in err and "5/5" in err
    ours.generate_until(reqs, disable_tqdm=True)
    ours.loglikelihood(ll, disable_tqdm=True)
    assert capsys.readouterr().err == ""
