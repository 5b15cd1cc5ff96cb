"""Data preparation: raw text in, memory-mapped token files out.

The path is ``read -> clean -> split -> tokenize -> write``:

1. **Read** documents from text files, folders (glob patterns, extensions), JSONL files
   (one JSON object a line, text under a named field), a Hugging Face dataset (name or
   ``save_to_disk`` folder, when ``datasets`` is installed), or the built-in corpus: the
   running interpreter's own standard library (``stdlib_corpus()``), which exists wherever
   Python runs.
2. **Clean** (``CleanConfig``; every step on by default and switchable): Unicode NFC,
   newlines normalised to ``\\n``, control characters removed, documents outside
   ``[min_chars, max_chars]`` dropped, exact duplicates dropped (SHA-256 of the cleaned
   text), and optionally personal data scrubbed (e-mail addresses, phone numbers, IP
   addresses, card-like numbers replaced by placeholders). ``CleanReport`` says how many
   documents and bytes each step removed.
3. **Split** train/val deterministically by the hash of each document's text
   (``val_fraction``). When a corpus has too few documents for a hash split to give both
   sides (a single text file such as tiny Shakespeare), the tail ``val_fraction`` of every
   document, cut at a line boundary, goes to val instead, as nanoGPT does.
4. **Tokenize** with the C++ tokenizer's batch encoder on all cores; an end-of-text token
   follows every document.
5. **Write** ``train.bin`` and ``val.bin`` (raw little-endian uint16 when the vocabulary
   fits, else uint32), the tokenizer, and ``meta.json`` (tokenizer, counts, source and
   cleaning summary). Every file is written atomically, and the same inputs give
   byte-identical files.

``TokenData`` reads a prepared folder back through ``numpy.memmap`` and draws batches.

==========  =========================================================================
module      what it holds
==========  =========================================================================
corpus.py   ``Document``, the readers (``read_documents``, ``stdlib_corpus``,
            ``load_hf_dataset``), ``CleanConfig``, ``CleanReport``, ``clean_documents``,
            ``split_documents``
tokens.py   the tokenizer helpers, ``prepare``, ``is_prepared``, ``TokenData``, folds
            (``token_documents``, ``assign_folds``, ``write_folds``)
==========  =========================================================================
"""
from .corpus import (DEFAULT_EXTENSIONS, CleanConfig, CleanReport, Document, clean_documents, clean_text,
                     load_hf_dataset, read_documents, split_documents, stdlib_corpus)
from .tokens import (FORMAT_VERSION, META_NAME, TOKENIZER_DIR, TokenData, assign_folds, inside, is_prepared,
                     load_tokenizer, prepare, token_documents, token_dtype, train_tokenizer, write_folds)

__all__ = [
    "Document",
    "stdlib_corpus",
    "load_hf_dataset",
    "read_documents",
    "CleanConfig",
    "CleanReport",
    "clean_text",
    "clean_documents",
    "split_documents",
    "load_tokenizer",
    "inside",
    "train_tokenizer",
    "token_dtype",
    "prepare",
    "is_prepared",
    "TokenData",
    "token_documents",
    "assign_folds",
    "write_folds",
    "DEFAULT_EXTENSIONS",
    "META_NAME",
    "TOKENIZER_DIR",
    "FORMAT_VERSION",
]
