"""What an adapter expects of its inputs (template, fields, lexical field, fusion embedding), saved
with it so that users pass raw records."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from lexlora.data.prompts import PromptTemplate
from lexlora.errors import DataError


@dataclass
class AdapterSpec:
    """What an adapter expects of its inputs; saved with it so users pass raw records."""

    input_template: str
    target_field: str
    lexical_field: str | None = None
    fusion_mode: str | None = None  # None: fusion disabled
    embedding_model: str | None = None
    embedding_dim: int | None = None

    @property
    def fusion_enabled(self) -> bool:
        return self.fusion_mode is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate(self.input_template)

    @property
    def input_fields(self) -> list[str]:
        """The record fields an input must have: the template's, plus the lexical field."""
        fields = list(self.template.fields)
        if self.lexical_field and self.lexical_field not in fields:
            fields.append(self.lexical_field)
        return fields

    def format_inputs(self, inputs: Sequence[str | Mapping[str, str]]) -> list[dict[str, str]]:
        """Raw inputs -> records: a string fills the adapter's single input field."""
        fields = self.input_fields
        return [self.format_input(item, index, fields) for index, item in enumerate(inputs)]

    def format_input(self, item: Any, index: int = 0, fields: list[str] | None = None) -> dict[str, str]:
        """One raw input (a string or a record) -> a record; `index` names it in errors."""
        fields = fields if fields is not None else self.input_fields
        if isinstance(item, str):
            if len(fields) != 1:
                raise DataError(
                    f"input {index}: this adapter needs the fields {fields}; pass a record (a JSON object) "
                    "rather than a plain string"
                )
            return {fields[0]: item}
        if not isinstance(item, Mapping):
            raise DataError(f"input {index}: expected a string or a record, got {type(item).__name__}")
        for name in fields:
            if not isinstance(item.get(name), str):
                raise DataError(f"input {index}: field {name!r} is missing or not a string")
        return {name: item[name] for name in fields}
