"""Records in, model-ready batches out: read + validate records, prompts and splits, tokenization
and the collator, lexical embeddings (cached), and `prepare_data` for a run."""

from typing import TYPE_CHECKING

from lexlora._exports import lazy_exports

_EXPORTS = {
    "Record": "records", "read_records": "records",
    "PromptTemplate": "prompts", "required_fields": "prompts",
    "load_splits": "splits", "split_records": "splits",
    "AdapterSpec": "spec",
    "EncodedSplit": "tokenization", "LexicalCollator": "tokenization", "encode_split": "tokenization",
    "EmbeddingCache": "embeddings", "LexicalEncoder": "embeddings",
    "PreparedData": "prepare", "prepare_data": "prepare",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from lexlora.data.records import Record, read_records  # noqa: F401
    from lexlora.data.prompts import PromptTemplate, required_fields  # noqa: F401
    from lexlora.data.splits import load_splits, split_records  # noqa: F401
    from lexlora.data.spec import AdapterSpec  # noqa: F401
    from lexlora.data.tokenization import EncodedSplit, LexicalCollator, encode_split  # noqa: F401
    from lexlora.data.embeddings import EmbeddingCache, LexicalEncoder  # noqa: F401
    from lexlora.data.prepare import PreparedData, prepare_data  # noqa: F401
