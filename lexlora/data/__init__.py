"""Records in, model-ready batches out: read + validate records, prompts and splits, tokenization
and the collator, lexical embeddings (cached), and `prepare_data` for a run."""

from lexlora._exports import lazy_exports

_EXPORTS = {
    "Record": "records", "read_records": "records",
    "PromptTemplate": "prompts", "required_fields": "prompts",
    "load_splits": "splits", "split_records": "splits",
    "LabelSet": "labels", "label_set": "labels", "class_weights": "labels",
    "AdapterSpec": "spec",
    "EncodedSplit": "tokenization", "LexicalCollator": "tokenization", "encode_split": "tokenization",
    "EmbeddingCache": "embeddings", "LexicalEncoder": "embeddings",
    "PreparedData": "prepare", "prepare_data": "prepare",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

