"""Chat templates: fastlm renders real templates byte for byte as transformers does
(``PreTrainedTokenizerFast.apply_chat_template`` on the same tokenizer directory), with and
without the generation prompt, in batches and as ids; a template's ``raise_exception``, syntax
errors and sandbox violations are a clear ``ChatTemplateError``; the plain template serves
models without one."""
import json

import pytest

pytest.importorskip("jinja2")
transformers = pytest.importorskip("transformers")

from fastlm import Tokenizer  # noqa: E402
from fastlm.tokenizer.chat_template import ChatTemplate, ChatTemplateError, read_chat_template  # noqa: E402

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>")
CORPUS = ("The quick brown fox jumps over the lazy dog. System prompts, user turns and assistant replies. "
          "Café, naïve, 你好世界, emoji 😀. ") * 20

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama-2's chat template: [INST] turns, the system message in <<SYS>>, roles must alternate.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")

# Llama-3's: header ids around each role, bos_token before the first message, content trimmed.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
          "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Zephyr's, written over several lines: trim_blocks and lstrip_blocks decide its whitespace.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# {% continue %} / {% break %} (jinja2.ext.loopcontrols), a namespace, dict(), strftime_now,
# {% generation %} blocks (transformers' marks of the assistant's text).
LOOPS = """{% set ns = namespace(count=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% if m['content'] == 'STOP' %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
{% if m['role'] == 'assistant' %}{% generation %}{{ ns.count }}. assistant: {{ m['content'] }}{% endgeneration %}
{% else %}{{ ns.count }}. {{ m['role'] }}: {{ m['content'] }}
{% endif %}
{% endfor %}
{% set d = dict(turns=ns.count) %}
turns={{ d['turns'] }} pct={{ strftime_now('%%') }}
{% if add_generation_prompt %}assistant:{% endif %}"""

# tojson: no HTML escaping, non-ASCII kept, keys in the caller's order, indent and separators;
# tools and documents reach the template; a key whose value is None is dropped from a message.
TOJSON = """{% if tools %}Tools: {{ tools | tojson }}
{% endif %}{% if documents %}{% for d in documents %}[{{ d['title'] }}] {{ d['text'] }}
{% endfor %}{% endif %}{% for m in messages %}{{ m | tojson }}
{{ m | tojson(indent=2) }}
{% if 'tool_calls' in m %}has tool_calls{% endif %}
{% endfor %}{% if add_generation_prompt %}{{ {"z": 1, "a": "é<>&'"} | tojson(separators=(",", ":")) }}{% endif %}"""

TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "llama3": LLAMA3, "zephyr": ZEPHYR, "loops": LOOPS, "tojson": TOJSON}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "system", "content": "Réponds en français. 你好"},
     {"role": "user", "content": "Bonjour <b>&</b> \"quotes\" 'apos'"},
     {"role": "assistant", "content": "Salut 😀\n", "tool_calls": None},
     {"role": "user", "content": "Encore?\n\nLigne deux."}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "STOP"}, {"role": "assistant", "content": "never shown by 'loops'"},
     {"role": "user", "content": "three"}],
]


def _tokenizer_dir(tmp_path, template, names):
    tok = Tokenizer.train([CORPUS], vocab_size=400, special_tokens=SPECIALS)
    tok.chat_template = template
    tok.special_tokens_map = names
    d = tmp_path / "tok"
    tok.save(d)
    return d


NAMES = {"chatml": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"},
         "llama2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<|endoftext|>"},
         "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
         "zephyr": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}}


@pytest.fixture(params=sorted(TEMPLATES))
def pair(request, tmp_path):
    """(name, fastlm Tokenizer, transformers tokenizer), both loaded from one saved directory."""
    name = request.param
    d = _tokenizer_dir(tmp_path, TEMPLATES[name], NAMES.get(name, {"eos_token": "<|endoftext|>"}))
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    tok = Tokenizer.load(d)
    assert tok.chat_template == TEMPLATES[name] == hf.chat_template
    assert tok.special_tokens_map == hf.special_tokens_map
    return name, tok, hf


def _valid(name, conversation):
    # Llama-2's template refuses conversations whose roles do not alternate.
    return not (name == "llama2" and conversation[0]["role"] == "user" and len(conversation) > 1
                and conversation[1]["role"] == "user")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_byte_identical_to_transformers(pair, add_generation_prompt):
    name, tok, hf = pair
    for conv in CONVERSATIONS:
        want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
        got = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        assert isinstance(got, str)
        assert got.encode("utf-8") == want.encode("utf-8"), (name, conv)
    # the generation prompt changes what it should, and only at the end
    with_gen = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    without = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False)
    if name in ("llama2",):  # Llama-2's template has no generation prompt
        assert with_gen == without
    else:
        assert with_gen != without and with_gen.startswith(without.rstrip("\n"))


def test_batches_tools_documents_and_ids_match_transformers(pair):
    name, tok, hf = pair
    batch = CONVERSATIONS[:3]
    want = hf.apply_chat_template(batch, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(batch) == want and len(want) == 3
    # ids: the template's special tokens as special tokens, the rest as the text's ordinary tokens
    want_ids = hf.apply_chat_template(batch, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.apply_chat_template(batch, tokenize=True) == [list(x) for x in want_ids]
    one = hf.apply_chat_template(CONVERSATIONS[2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.apply_chat_template(CONVERSATIONS[2], tokenize=True) == list(one)
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"zeta": 1, "alpha": [1, 2]}}}]
    docs = [{"title": "Doc é", "text": "Body <tag>"}]
    kw = dict(tools=tools, documents=docs, add_generation_prompt=True)
    assert tok.apply_chat_template(CONVERSATIONS[1], **kw) == hf.apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                                                                     **kw)


def test_tojson_keeps_non_ascii_and_key_order(tmp_path):
    d = _tokenizer_dir(tmp_path, TOJSON, {"eos_token": "<|endoftext|>"})
    out = Tokenizer.load(d).apply_chat_template([{"role": "user", "content": "é<>&", "zz": 1, "aa": None}])
    assert '{"role": "user", "content": "é<>&", "zz": 1}' in out  # no \\u00e9, no &lt;, no None key, order kept
    assert out.endswith('{"z":1,"a":"é<>&\'"}')


def test_continue_final_message_matches_transformers(tmp_path):
    d = _tokenizer_dir(tmp_path, CHATML, NAMES["chatml"])
    tok, hf = Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(str(d))
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is "}]
    want = hf.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    got = tok.apply_chat_template(conv, add_generation_prompt=False, continue_final_message=True)
    assert got == want and got.endswith("<|im_start|>assistant\nThe colour is ")
    with pytest.raises(ValueError, match="cannot both"):
        tok.apply_chat_template(conv, add_generation_prompt=True, continue_final_message=True)


def test_raise_exception_is_a_clear_error(tmp_path):
    d = _tokenizer_dir(tmp_path, LLAMA2, NAMES["llama2"])
    tok, hf = Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(str(d))
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as e:
        tok.apply_chat_template(bad)
    assert isinstance(e.value, ValueError)
    with pytest.raises(ChatTemplateError, match="alternate"):
        tok.apply_chat_template(bad, tokenize=True)
    with pytest.raises(ChatTemplateError, match="alternate"):
        ChatTemplate(LLAMA2, bos_token="<s>", eos_token="</s>").encode(bad, tok)


@pytest.mark.parametrize("source, match", [
    ("{% for m in messages %}{{ m['content'] }", "does not compile"),
    ("{{ ''.__class__.__mro__ }}", "failed"),
    ("{% set ns = namespace(_x=1) %}{{ ns }}", "underscore"),
    ("{{ messages[0]['content'] + 1 }}", "failed"),
])
def test_template_failures_are_clear_errors(source, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_plain_template_and_bad_input():
    tok = Tokenizer.train([CORPUS], vocab_size=300)
    assert tok.chat_template is None
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    assert tok.apply_chat_template(conv) == "Be brief.\n\nUser: To be?\n\nAssistant:"
    assert tok.apply_chat_template(conv, add_generation_prompt=False) == "Be brief.\n\nUser: To be?\n\n"
    assert tok.apply_chat_template(conv, tokenize=True) == tok.encode("Be brief.\n\nUser: To be?\n\nAssistant:")
    assert tok.apply_chat_template(conv, chat_template="{{ messages | length }}") == "2"
    assert ChatTemplate(None).stop == ["\nUser:"] and ChatTemplate(CHATML).stop == []
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match="dict"):
        tok.apply_chat_template(["hello"])
    with pytest.raises(TypeError, match="list"):
        tok.apply_chat_template("hello")


def test_template_files(tmp_path):
    # chat_template.jinja wins over tokenizer_config.json's; AddedToken dicts give their content;
    # several named templates: the "default" one.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "default", "template": "D{{ bos_token }}"}, {"name": "tool_use", "template": "T"}],
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True}, "eos_token": "</s>"}))
    source, names = read_chat_template(tmp_path)
    assert source == "D{{ bos_token }}" and names == {"bos_token": "<s>", "eos_token": "</s>"}
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "D<s>"
    (tmp_path / "chat_template.jinja").write_text("J{{ eos_token }}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "J</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "a", "template": "A"}]}))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ChatTemplateError, match="default"):
        read_chat_template(tmp_path)
    assert ChatTemplate.from_dir(tmp_path / "absent").source is None


def test_serve_module_reexports_the_shared_one():
    import fastlm.serve.chat_template as serve_ct
    import fastlm.tokenizer.chat_template as ct

    assert serve_ct.ChatTemplate is ct.ChatTemplate and serve_ct.encode_text is ct.encode_text
