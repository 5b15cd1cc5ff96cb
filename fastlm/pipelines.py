"""``fastlm.pipeline(task, model=...)``, shaped like Hugging Face's pipelines.

- ``"text-generation"``: ``pipe("Once upon a time")`` returns ``[{"generated_text": ...}]``; a chat
  (a list of ``{"role", "content"}`` dicts, or a list of chats) is rendered with the model's chat
  template and returns ``[{"generated_text": messages + [{"role": "assistant", "content": reply}]}]``,
  as transformers' pipeline does.
- ``"question-answering"``: ``pipeline(..., documents=...)`` cuts the documents into passages
  (paragraphs, long ones at sentence boundaries), indexes them with ``fastlm.features.TfidfIndex``,
  and ``pipe("question")`` puts the best passages in the prompt and returns ``{"answer",
  "sources": [{"document", "passage", "score"}], "grounded", "note"}``. Without documents the
  model answers alone (``sources == []``, ``grounded`` False and a ``note`` that says so).
- ``"text-classification"`` (alias ``"sentiment-analysis"``): a ``fastlm.models.heads.SequenceClassifier``;
  ``pipe(text, top_k=1)`` returns ``[{"label", "score"}, ...]`` (a list of those for a list of texts).
- ``"translation"``: a GPT fine-tuned on pairs (``fastlm.finetune``); ``pipe(text)`` returns
  ``[{"translation_text": ...}]``, greedy by default.

The model is an object or a directory. A directory holds the model in the Hugging Face layout
(``generation_config.json`` gives the default generation options), its tokenizer, and for a
task pipeline ``pipeline.json`` (the task's settings), ``head.safetensors`` (a classifier's
head) and ``index/`` (a question-answering index). ``pipe.save_pretrained(dir)`` writes all of
it (atomically, no pickles) and ``load_pipeline(dir)`` reads it back whatever the task. The
tokenizer is any tiktoken-like object (``encode``, ``decode_bytes``/``token_bytes``,
``eot_token``) or a directory, by default the model's, loaded with ``fastlm.Tokenizer.load``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ._io import CheckpointError, read_json
from .hub import resolve_pretrained
from .generation.generate import GenerateOutput, encode_prompt, generate
from .models import GPT, ids_in_vocab
from .models.checkpoint import read_pipeline_config, write_pipeline_config
from .models.heads import PROMPT_TEMPLATE, SequenceClassifier, TranslationLM, translation_prompt
from .tokenizer import load_tokenizer, resolve_tokenizer
from .tokenizer.chat_template import ChatTemplate

__all__ = ["pipeline", "load_pipeline", "load_tokenizer", "split_passages", "TextGenerationPipeline",
           "QuestionAnsweringPipeline", "TextClassificationPipeline", "TranslationPipeline"]

_GEN_KEYS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "eos_token_id")
_TASKS = {"text-generation": "text-generation", "question-answering": "question-answering",
          "text-classification": "text-classification", "sentiment-analysis": "text-classification",
          "translation": "translation"}


def pipeline(task: str, model=None, tokenizer=None, device=None, dtype=None, revision: str | None = None, **kwargs):
    """A pipeline for ``task`` (see the module's doc); ``model`` is an object, a directory, or a
    Hugging Face repo id (``"gpt2"``; found in the local cache or downloaded, see ``fastlm.hub``),
    at ``revision`` (a branch, tag or commit) for a repo id."""
    name = _TASKS.get(task)
    if name is None:
        raise ValueError(f"fastlm.pipeline supports the tasks {', '.join(repr(t) for t in _TASKS)}, got {task!r}")
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model= (a model object or a directory)")
    if isinstance(model, (str, os.PathLike)):
        model = resolve_pretrained(model, revision)
        saved = read_pipeline_config(model)
        if saved is not None and saved["task"] != name:
            raise ValueError(f"{model} holds a {saved['task']!r} pipeline, not {task!r}; "
                             "fastlm.pipelines.load_pipeline(dir) loads whatever a directory holds")
    cls = {"text-generation": TextGenerationPipeline, "question-answering": QuestionAnsweringPipeline,
           "text-classification": TextClassificationPipeline, "translation": TranslationPipeline}[name]
    return cls(model, tokenizer=tokenizer, device=device, dtype=dtype, **kwargs)


def load_pipeline(path, **kwargs):
    """The pipeline a directory holds: its ``pipeline.json`` names the task; a plain model
    directory (no ``pipeline.json``) gives a text-generation pipeline."""
    saved = read_pipeline_config(path)
    return pipeline(saved["task"] if saved else "text-generation", model=path, **kwargs)


def _save_tokenizer(tokenizer, path) -> None:
    save = getattr(tokenizer, "save", None)
    if not callable(save):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no save(); a pipeline directory needs one "
                         "(use a fastlm.Tokenizer, e.g. fastlm.Tokenizer.from_tiktoken(encoding))")
    save(str(path))


class TextGenerationPipeline:
    task = "text-generation"

    def __init__(self, model, tokenizer=None, device=None, dtype=None, weights=None, **defaults):
        path = None
        if isinstance(model, (str, os.PathLike)):
            path = resolve_pretrained(model)
            model = GPT.from_pretrained(path, dtype=dtype, device=device, weights=weights)
        elif not isinstance(model, GPT):
            raise TypeError(f"model must be a fastlm.GPT or a checkpoint directory, got {type(model).__name__}")
        elif weights is not None:
            raise ValueError("weights= quantizes a checkpoint as it loads; for a model object call model.quantize(...)")
        self.model = model
        self.model_dir = path
        self.tokenizer = resolve_tokenizer(tokenizer, path, "pipeline")
        self._chat_template = None
        self.defaults = {}
        if path is not None and (path / "generation_config.json").is_file():
            cfg = read_json(path / "generation_config.json")
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{path / 'generation_config.json'} must hold a JSON object")
            self.defaults = {k: cfg[k] for k in _GEN_KEYS if cfg.get(k) is not None}
            if self.defaults.get("eos_token_id") is not None:  # read as config.json's is
                self.defaults["eos_token_id"] = ids_in_vocab("generation_config.json: eos_token_id",
                                                             self.defaults["eos_token_id"], model.config.vocab_size)
        unknown = set(defaults) - set(_GEN_KEYS) - {"stop", "seed"}
        if unknown:
            raise TypeError(f"pipeline got unexpected keyword arguments {sorted(unknown)}")
        self.defaults.update(defaults)
        if self.defaults.get("eos_token_id") is None and model.config.eos_token_id is None:
            # the tokenizer in use (loaded from the model's directory when none was given)
            eot = getattr(self.tokenizer, "eot_token", None)
            if eot is not None and 0 <= eot < model.config.vocab_size:  # an id the model can produce
                self.defaults["eos_token_id"] = eot

    @property
    def chat_template(self) -> ChatTemplate:
        """The template chats are rendered with: the tokenizer's, else the model directory's,
        else the plain one (``ChatTemplate.for_tokenizer``)."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.for_tokenizer(self.tokenizer, self.model_dir)
        return self._chat_template

    def __call__(self, text_inputs, num_return_sequences: int = 1, return_full_text: bool = True,
                 return_tensors: bool = False, continue_final_message: bool | None = None, **kwargs):
        """Continue a text or a list of texts, or a chat or a list of chats (each a list of
        ``{"role", "content"}`` dicts). A chat is rendered with ``chat_template``, ending with the
        generation prompt, or, when its last message is the assistant's (or
        ``continue_final_message=True``), inside that message so the reply continues it; its
        results hold the chat with the reply appended as the assistant's message (or the
        reply alone with ``return_full_text=False``), as transformers' pipeline returns them."""
        chats = _as_chats(text_inputs)
        if chats is not None:
            return self._chat(chats[0], chats[1], num_return_sequences, return_full_text, return_tensors,
                              continue_final_message, kwargs)
        single = isinstance(text_inputs, str)
        texts = [text_inputs] if single else list(text_inputs)
        if not texts:
            raise ValueError("pipeline: no text given")
        opts = self._options(num_return_sequences, kwargs)
        prompts = [encode_prompt(self.tokenizer, t) for t in texts]
        batch = [p for p in prompts for _ in range(num_return_sequences)]
        out: GenerateOutput = generate(self.model, batch, tokenizer=self.tokenizer, return_dict_in_generate=True, **opts)
        results = []
        for i, text in enumerate(texts):
            group = []
            for j in range(i * num_return_sequences, (i + 1) * num_return_sequences):
                if return_tensors:
                    ids = (prompts[i] if return_full_text else []) + out.tokens[j]
                    group.append({"generated_token_ids": ids})
                else:
                    group.append({"generated_text": (text if return_full_text else "") + out.texts[j]})
            results.append(group)
        return results[0] if single else results

    def _options(self, num_return_sequences, kwargs) -> dict:
        """The generation options of a call: the pipeline's defaults updated by ``kwargs``, checked."""
        n = num_return_sequences
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {n!r}")
        opts = {**self.defaults, **kwargs}
        unknown = set(opts) - set(_GEN_KEYS) - {"stop", "seed", "context_overflow", "kv_dtype"}
        if unknown:
            raise TypeError(f"pipeline got unexpected keyword arguments {sorted(unknown)}")
        if num_return_sequences > 1 and not (opts.get("do_sample") and opts.get("temperature", 1.0) != 0):
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding would repeat one answer)")
        if opts.get("max_new_tokens") is None and opts.get("max_length") is None:
            opts["max_new_tokens"] = 50
        if opts.get("max_new_tokens") is not None:
            opts.pop("max_length", None)
        return opts

    def _chat(self, chats, single, num_return_sequences, return_full_text, return_tensors, continue_final_message,
              kwargs):
        opts = self._options(num_return_sequences, kwargs)
        template = self.chat_template
        if template.stop:  # the plain template's next user turn ends the reply
            stop = opts.get("stop")
            opts["stop"] = ([stop] if isinstance(stop, str) else list(stop or [])) + template.stop
        prompts, prefill = [], []
        for messages in chats:
            cont = bool(continue_final_message) if continue_final_message is not None \
                else messages[-1]["role"] == "assistant"  # a chat ending with the assistant's words: a prefill
            ids = template.encode(messages, self.tokenizer, add_generation_prompt=not cont,
                                  continue_final_message=cont)
            if not ids:
                raise ValueError("empty prompt: the chat template rendered these messages as no tokens")
            prompts.append(ids)
            prefill.append(cont)
        batch = [p for p in prompts for _ in range(num_return_sequences)]
        out: GenerateOutput = generate(self.model, batch, tokenizer=self.tokenizer, return_dict_in_generate=True,
                                       **opts)
        results = []
        for i, messages in enumerate(chats):
            group = []
            for j in range(i * num_return_sequences, (i + 1) * num_return_sequences):
                if return_tensors:
                    group.append({"generated_token_ids": (prompts[i] if return_full_text else []) + out.tokens[j]})
                elif not return_full_text:
                    group.append({"generated_text": out.texts[j]})
                elif prefill[i]:  # the reply continues the last message
                    last = messages[-1]
                    group.append({"generated_text": list(messages[:-1]) + [
                        {"role": last["role"], "content": last["content"] + out.texts[j]}]})
                else:
                    group.append({"generated_text": list(messages) + [{"role": "assistant", "content": out.texts[j]}]})
            results.append(group)
        return results[0] if single else results

    def generate_ids(self, prompts, **kwargs) -> list[str]:
        """The generated text (prompt excluded) for each list of prompt token ids; options are
        the pipeline's defaults updated by ``kwargs``."""
        opts = {**self.defaults, **kwargs}
        out: GenerateOutput = generate(self.model, prompts, tokenizer=self.tokenizer, return_dict_in_generate=True,
                                       **opts)
        return out.texts

    def save_pretrained(self, path) -> None:
        """The model (Hugging Face layout) and its tokenizer, in one directory."""
        self.model.save_pretrained(path)
        _save_tokenizer(self.tokenizer, path)


def _as_chats(inputs):
    """(list of chats, whether one chat was given) when ``inputs`` is a chat (a list of message
    dicts) or a list of chats, else None (text input). Every message needs a role and content."""
    if not isinstance(inputs, (list, tuple)) or not inputs:
        return None
    first = inputs[0]
    if isinstance(first, dict):
        chats, single = [inputs], True
    elif isinstance(first, (list, tuple)) and first and isinstance(first[0], dict):
        chats, single = list(inputs), False
    else:
        return None
    for c, chat in enumerate(chats):
        if not isinstance(chat, (list, tuple)) or not chat:
            raise ValueError(f"pipeline: chat {c} must be a non-empty list of messages")
        for m in chat:
            if not (isinstance(m, dict) and "role" in m and "content" in m):
                raise ValueError("pipeline: each message of a chat must be a dict with 'role' and 'content'")
    return chats, single


# ----------------------------------------------------------------------------- question answering
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_QA_HEADER = "Answer the question using the passages below.\n\n"
_MIN_PASSAGE_TOKENS = 8  # a passage cut shorter than this is left out


def split_passages(text: str, max_chars: int = 600) -> list[str]:
    """Cut ``text`` into passages of at most ``max_chars`` characters: paragraphs (split at
    blank lines), a longer paragraph at sentence ends (after ``.``, ``!`` or ``?``), a longer
    sentence at the last space before the limit. Whitespace runs become single spaces."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    passages = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if len(para) <= max_chars:
            if para:
                passages.append(para)
            continue
        current = ""
        for sentence in _SENTENCE_END.split(para):
            while len(sentence) > max_chars:
                cut = sentence.rfind(" ", 0, max_chars + 1)
                cut = cut if cut > 0 else max_chars
                if current:
                    passages.append(current)
                    current = ""
                passages.append(sentence[:cut].strip())
                sentence = sentence[cut:].strip()
            if current and len(current) + 1 + len(sentence) > max_chars:
                passages.append(current)
                current = sentence
            else:
                current = f"{current} {sentence}" if current else sentence
        if current:
            passages.append(current)
    return passages


def _named_documents(documents) -> list[tuple[str, str]]:
    """(name, text) pairs from a mapping name -> text, or a list of texts (named "doc-0", ...),
    paths (named by the path, read as UTF-8) or (name, text) pairs."""
    if isinstance(documents, (str, bytes)):
        raise TypeError("documents must be a list (or a mapping name -> text), not a single string")
    items = list(documents.items()) if hasattr(documents, "items") else list(documents)
    if not items:
        raise ValueError("documents is empty: give at least one document, or leave documents out to answer "
                         "from the model alone")
    named = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            name, text = f"doc-{i}", item
        elif isinstance(item, os.PathLike):
            name, text = str(item), Path(item).read_text(encoding="utf-8")
        elif isinstance(item, tuple) and len(item) == 2:
            name, text = str(item[0]), item[1]
        else:
            raise TypeError(f"document {i} is a {type(item).__name__}; give texts, paths or (name, text) pairs")
        if not isinstance(text, str):
            raise TypeError(f"document {name!r} is a {type(text).__name__}, expected its text as a str")
        named.append((name, text))
    return named


class QuestionAnsweringPipeline:
    """Answers questions from retrieved passages (see the module's doc).

    The prompt is a header, the passages (each as ``[n] NAME:`` and its text, NAME being the
    document's name, or its file name where the name is a path) and ``Question: ...\\nAnswer:``.
    ``max_new_tokens`` of the model's context stay free for the answer, and the question always
    fits whole: passages go in best first while they fit, the last one cut to the room left
    (``sources`` lists the passages that went in, each whole); a question that does not fit
    alone is an error."""

    task = "question-answering"

    def __init__(self, model, tokenizer=None, device=None, dtype=None, documents=None, index=None,
                 top_k: int | None = None, max_passage_chars: int | None = None, max_new_tokens: int | None = None,
                 **generate_defaults):
        from .features import TfidfIndex  # scipy loads only for question answering (start-up time)

        saved = read_pipeline_config(model) if isinstance(model, (str, os.PathLike)) else None
        saved = saved or {}
        self.generator = TextGenerationPipeline(model, tokenizer=tokenizer, device=device, dtype=dtype,
                                                **generate_defaults)
        self.top_k = top_k if top_k is not None else saved.get("top_k", 3)
        self.max_passage_chars = max_passage_chars if max_passage_chars is not None else saved.get(
            "max_passage_chars", 600)
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else saved.get("max_new_tokens", 64)
        if documents is not None and index is not None:
            raise ValueError("give documents= or index=, not both")
        self.index, self.sources = None, []
        if documents is not None:
            self.set_documents(documents)
        elif index is not None:
            if not isinstance(index, TfidfIndex):
                raise TypeError(f"index must be a fastlm.features.TfidfIndex, got {type(index).__name__}")
            self.index, self.sources = index, [str(i) for i in index.ids]
        elif saved and (Path(model) / "index").is_dir():
            self.index = TfidfIndex.load(Path(model) / "index")
            self.sources = list(saved.get("sources", []))
            if len(self.sources) != len(self.index):
                raise ValueError(f"{model}: pipeline.json names {len(self.sources)} sources for the index's "
                                 f"{len(self.index)} passages")

    def set_documents(self, documents) -> None:
        """Index ``documents`` (replacing any index): passages named by their document."""
        from .features import TfidfIndex

        passages, sources = [], []
        for name, text in _named_documents(documents):
            for p in split_passages(text, self.max_passage_chars):
                passages.append(p)
                sources.append(name)
        if not passages:
            raise ValueError("the documents hold no text")
        self.index, self.sources = TfidfIndex(passages), sources

    def retrieve(self, question: str, top_k: int | None = None) -> list[dict]:
        """The best passages for ``question``: ``[{"document", "passage", "score"}]``, best first."""
        if self.index is None:
            return []
        pos = {i: n for n, i in enumerate(self.index.ids)}
        return [{"document": self.sources[pos[hit["id"]]], "passage": hit["text"], "score": hit["score"]}
                for hit in self.index.search(question, k=top_k or self.top_k)]

    def build_prompt(self, question: str, hits: list[dict], max_new_tokens: int) -> tuple[list[int], list[dict]]:
        """The prompt's token ids and the hits that went into it (see the class's doc)."""
        tok = self.generator.tokenizer
        context = self.generator.model.config.block_size
        q_ids = list(tok.encode(f"Question: {question.strip()}\nAnswer:"))
        room = context - max_new_tokens - len(q_ids)
        if room < 0:
            raise ValueError(f"the question is {len(q_ids)} tokens (with its frame); with max_new_tokens="
                             f"{max_new_tokens} for the answer that exceeds the model's context of {context} tokens: "
                             "shorten the question or lower max_new_tokens")
        head = list(tok.encode(_QA_HEADER))
        room -= len(head)
        body, used = [], []
        for n, hit in enumerate(hits, 1):
            label = list(tok.encode(f"[{n}] {os.path.basename(hit['document']) or hit['document']}:\n"))
            text = list(tok.encode(hit["passage"] + "\n\n"))
            if room - len(label) < min(len(text), _MIN_PASSAGE_TOKENS):
                break
            text = text[:room - len(label)]
            body += label + text
            room -= len(label) + len(text)
            used.append(hit)
        if not used:
            return q_ids, []
        return head + body + q_ids, used

    def __call__(self, question, top_k: int | None = None, max_new_tokens: int | None = None, **generate_kwargs):
        """The answer to a question (a dict), or to each of a list of questions (a list)."""
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"a question must be a non-empty string, got {q!r}")
        max_new = max_new_tokens or self.max_new_tokens
        results = []
        for q in questions:
            hits = self.retrieve(q, top_k)
            prompt, used = self.build_prompt(q, hits, max_new)
            opts = {"stop": ["\n\n"], **generate_kwargs, "max_new_tokens": max_new}
            answer = self.generator.generate_ids([prompt], **opts)[0].strip()
            if used:
                note = None
            elif self.index is None:
                note = "no documents given: the answer comes from the model alone"
            elif not hits:
                note = "no passage matched the question: the answer comes from the model alone"
            else:
                note = "no passage fit in the model's context: the answer comes from the model alone"
            results.append({"answer": answer, "sources": used, "grounded": bool(used), "note": note})
        return results[0] if single else results

    def save_pretrained(self, path) -> None:
        """Model, tokenizer, the index (``index/``) and ``pipeline.json`` in one directory."""
        path = Path(path)
        self.generator.save_pretrained(path)
        if self.index is not None:
            self.index.save(path / "index")
        write_pipeline_config(path, {"task": self.task, "top_k": self.top_k,
                                     "max_passage_chars": self.max_passage_chars,
                                     "max_new_tokens": self.max_new_tokens, "sources": self.sources})


# ----------------------------------------------------------------------------- classification
class TextClassificationPipeline:
    """Labels texts with a ``fastlm.models.heads.SequenceClassifier`` (or a directory holding one).
    Texts longer than the model's context keep their first tokens."""

    task = "text-classification"

    def __init__(self, model, tokenizer=None, device=None, dtype=None, batch_size: int = 32):
        if isinstance(model, (str, os.PathLike)):
            path = model
            model = SequenceClassifier.from_pretrained(model, dtype=dtype, device=device)
            tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
        elif not isinstance(model, SequenceClassifier):
            raise TypeError(f"model must be a fastlm.models.heads.SequenceClassifier or a pipeline directory, got "
                            f"{type(model).__name__} (a plain GPT has no classification head: fine-tune one with "
                            "`fastlm finetune --task classification`)")
        if tokenizer is None:
            raise ValueError("pipeline: pass tokenizer= when model is a model object")
        self.model = model.eval()
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.labels = list(model.labels)
        self.batch_size = batch_size

    @torch.no_grad()
    def predict_proba(self, texts) -> torch.Tensor:
        """Label probabilities (len(texts), len(labels)), columns in ``labels`` order."""
        block = self.model.config.block_size
        seqs = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, expected a str")
            ids = list(self.tokenizer.encode(t))[:block]
            if not ids:
                raise ValueError(f"text {i} is empty")
            seqs.append(ids)
        out = []
        for k in range(0, len(seqs), self.batch_size):
            chunk = seqs[k:k + self.batch_size]
            x = torch.full((len(chunk), max(len(s) for s in chunk)), -1, dtype=torch.long)
            for r, ids in enumerate(chunk):
                x[r, :len(ids)] = torch.tensor(ids)
            out.append(torch.softmax(self.model(x.to(self.model.device)).float(), dim=-1).cpu())
        return torch.cat(out)

    def __call__(self, inputs, top_k: int | None = 1):
        """``[{"label", "score"}]`` (the ``top_k`` best, best first; None: every label) for a
        text, or a list of those for a list of texts."""
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        if not texts:
            raise ValueError("pipeline: no text given")
        n = len(self.labels)
        if top_k is None:
            top_k = n
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k:
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        scores, order = self.predict_proba(texts).sort(dim=-1, descending=True)
        results = [[{"label": self.labels[j], "score": float(s)} for s, j in zip(row_s[:top_k].tolist(),
                                                                               row_o[:top_k].tolist())]
                   for row_s, row_o in zip(scores, order)]
        return results[0] if single else results

    def save_pretrained(self, path) -> None:
        """Model, head, tokenizer and ``pipeline.json`` in one directory."""
        self.model.save_pretrained(path)
        _save_tokenizer(self.tokenizer, path)


# ----------------------------------------------------------------------------- translation
class TranslationPipeline:
    """Translates with a GPT fine-tuned on pairs (``fastlm.models.heads.TranslationLM`` or a directory
    holding one): the model continues ``translation_prompt(text)`` until end of text or a newline.
    ``src_lang``/``tgt_lang`` default to the saved ones and must match them; a plain GPT (no
    ``pipeline.json``) needs both."""

    task = "translation"

    def __init__(self, model, tokenizer=None, device=None, dtype=None, src_lang: str | None = None,
                 tgt_lang: str | None = None, max_new_tokens: int | None = None, batch_size: int = 32,
                 **generate_defaults):
        saved = {}
        if isinstance(model, TranslationLM):
            saved = model.task_config()
            model = model.gpt
        elif isinstance(model, (str, os.PathLike)):
            saved = read_pipeline_config(model) or {}
        for name, given in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if saved and given is not None and given != saved[name]:
                raise ValueError(f"this model translates {saved['src_lang']} to {saved['tgt_lang']}; "
                                 f"{name}={given!r} does not match")
        self.src_lang = src_lang or saved.get("src_lang")
        self.tgt_lang = tgt_lang or saved.get("tgt_lang")
        if not self.src_lang or not self.tgt_lang:
            raise ValueError("pipeline('translation') on a model without a saved translation config needs "
                             "src_lang= and tgt_lang=")
        self.template = saved.get("prompt", PROMPT_TEMPLATE)
        self.max_new_tokens = max_new_tokens or 128
        self.batch_size = batch_size
        self.generator = TextGenerationPipeline(model, tokenizer=tokenizer, device=device, dtype=dtype,
                                                **generate_defaults)

    def __call__(self, inputs, max_new_tokens: int | None = None, **generate_kwargs):
        """``[{"translation_text": ...}]`` for a text; for a list of texts, one dict per text."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts:
            raise ValueError("pipeline: no text given")
        tok, block = self.generator.tokenizer, self.generator.model.config.block_size
        prompts = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, expected a str")
            ids = encode_prompt(tok, translation_prompt(t, self.src_lang, self.tgt_lang, self.template))
            if len(ids) >= block:
                raise ValueError(f"text {i}: the prompt is {len(ids)} tokens, which leaves no room for the translation "
                                 f"in the model's context of {block}")
            prompts.append(ids)
        outputs = []
        for k in range(0, len(prompts), self.batch_size):  # decoded together, batch_size at a time
            chunk = prompts[k:k + self.batch_size]
            max_new = min(max_new_tokens or self.max_new_tokens, block - max(len(p) for p in chunk))
            opts = {"stop": ["\n"], **generate_kwargs, "max_new_tokens": max_new}
            outputs += self.generator.generate_ids(chunk, **opts)
        return [{"translation_text": t.strip()} for t in outputs]

    def save_pretrained(self, path) -> None:
        """Model, tokenizer and ``pipeline.json`` in one directory."""
        self.generator.save_pretrained(path)
        write_pipeline_config(path, TranslationLM(self.generator.model, self.src_lang, self.tgt_lang,
                                                  self.template).task_config())
