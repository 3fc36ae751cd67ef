"""Prompts: a `str.format` template over named record fields, and which fields a config needs."""

from __future__ import annotations

import string
from typing import Mapping

from lexlora.config import DataConfig
from lexlora.errors import ConfigError


class PromptTemplate:
    """A `str.format` template over named record fields, e.g. "Filename: {filename} Description:"."""

    def __init__(self, template: str):
        self.template = template
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigError(f"data.input_template {template!r} is not a valid template: {exc}") from None
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                raise ConfigError(
                    f"data.input_template {template!r}: {{{name}}} must name a record field, e.g. {{filename}}"
                )
            if name not in fields:
                fields.append(name)
        if not fields:
            raise ConfigError(f"data.input_template {template!r} names no field, e.g. {{filename}}")
        self.fields = tuple(fields)

    def format(self, record: Mapping[str, str]) -> str:
        return self.template.format(**{name: record[name] for name in self.fields})


def lexical_field_for(template: PromptTemplate, lexical_field: str | None) -> str:
    if lexical_field is not None:
        return lexical_field
    if len(template.fields) == 1:
        return template.fields[0]
    raise ConfigError(
        f"data.input_template uses several fields {template.fields}; "
        "set data.lexical_field to the one whose text feeds the fusion projection"
    )


def required_fields(data: DataConfig, fusion_enabled: bool) -> tuple[PromptTemplate, str | None, list[str]]:
    template = PromptTemplate(data.input_template)
    lexical = lexical_field_for(template, data.lexical_field) if fusion_enabled else None
    fields = list(template.fields)
    for extra in (data.target_field, lexical):
        if extra is not None and extra not in fields:
            fields.append(extra)
    return template, lexical, fields
