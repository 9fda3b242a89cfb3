"""Typed option schemas: every dict option is checked field by field before anything runs.

A backup tool that misreads an option destroys the data it exists to protect (``swap: "n"``
once swapped a live database out). So each dict of options the engine accepts (a kind's
source and target fields, storage, encryption, compression, retention, metrics) is declared
here as a :class:`Schema` of :class:`Field` objects with a type, bounds or choices, and a
one-line description, and :meth:`Schema.validate` turns what a user wrote into typed values
or raises one ConfigError naming the field and the value. The runner's job file and the
modules go through the same schemas, because both end in the engine's constructors.

Booleans accept exactly what Ansible's ``boolean()`` accepts (``yes``/``no``, ``on``/``off``,
``true``/``false``, ``y``/``n``, ``t``/``f``, ``1``/``0``, case-insensitive) and nothing else.
"""

import math
import os
import re
from dataclasses import dataclass
from typing import ClassVar, Optional

from .errors import ConfigError

# Ansible's module_utils.parsing.convert_bool sets, written out (no Ansible import here).
BOOLEANS_TRUE = frozenset(("y", "yes", "on", "1", "true", "t"))
BOOLEANS_FALSE = frozenset(("n", "no", "off", "0", "false", "f"))
SECRET_SUFFIXES = ("_file", "_env")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_NUMBER = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")


def _shown(value):
    """A value as an error message shows it: short, and never more than one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_bool(value, name):
    """``value`` as Ansible's ``boolean()`` reads it; ConfigError naming ``name`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in BOOLEANS_TRUE:
            return True
        if text in BOOLEANS_FALSE:
            return False
    raise ConfigError("%s must be a boolean (true/false, yes/no, on/off, 1/0), got %s" % (name, _shown(value)))


def parse_int(value, name, minimum=None, maximum=None):
    """A whole number (an int, or a string of digits); never a bool or a fraction."""
    if isinstance(value, str) and _INTEGER.match(value.strip()):
        number = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ConfigError("%s must be a whole number, got %s" % (name, _shown(value)))
    _check_bounds(number, name, minimum, maximum)
    return number


def parse_number(value, name, minimum=None, maximum=None):
    """A number (int, float or numeric string); never a bool, NaN or infinity."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value.strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        number = value
    else:
        raise ConfigError("%s must be a number, got %s" % (name, _shown(value)))
    _check_bounds(number, name, minimum, maximum)
    return number


def _check_bounds(number, name, minimum, maximum):
    if minimum is not None and number < minimum:
        raise ConfigError("%s must be at least %s, got %s" % (name, minimum, number))
    if maximum is not None and number > maximum:
        raise ConfigError("%s must be at most %s, got %s" % (name, maximum, number))


def _text(value, name):
    # Numbers read from YAML (a port written as text elsewhere, a numeric user name) are
    # accepted as their text, as Ansible's 'str' type does; booleans and containers are not.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError("%s must be a string, got %s" % (name, _shown(value)))


@dataclass(frozen=True)
class Field:
    """One option: its type and constraints.

    ``type`` is one of ``bool``, ``int``, ``number``, ``str``, ``path``, ``enum``, ``list``
    (of strings; one string is a list of one, or is cut at ``split``: "," or " " for any
    whitespace), ``dict`` or
    ``any`` (checked by the code that uses it). ``secret`` fields may also be given as
    ``<name>_file`` (a path) or ``<name>_env`` (an environment variable name).
    """

    TYPES: ClassVar[tuple] = ("bool", "int", "number", "str", "path", "enum", "list", "dict", "any")

    type: str
    description: str
    choices: Optional[tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    secret: bool = False
    absolute: bool = False
    split: Optional[str] = None
    nonempty: bool = False
    exclusive_minimum: Optional[float] = None

    def __post_init__(self):
        if self.type not in self.TYPES:
            raise ValueError("unknown field type %r" % self.type)
        if (self.type == "enum") != (self.choices is not None):
            raise ValueError("choices go with type enum, and only with it")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    def parse(self, value, name):
        """``value`` converted to this field's type; ConfigError naming ``name`` otherwise."""
        kind = self.type
        if kind == "bool":
            return parse_bool(value, name)
        if kind == "int":
            return parse_int(value, name, self.minimum, self.maximum)
        if kind == "number":
            number = parse_number(value, name, self.minimum, self.maximum)
            if self.exclusive_minimum is not None and number <= self.exclusive_minimum:
                raise ConfigError("%s must be greater than %s, got %s" % (name, self.exclusive_minimum, number))
            return number
        if kind == "enum":
            if isinstance(value, str) and value in self.choices:
                return value
            raise ConfigError("%s must be one of %s, got %s" % (name, ", ".join(self.choices), _shown(value)))
        if kind in ("str", "path"):
            text = _text(value, name)
            if (self.nonempty or kind == "path") and not text.strip():
                raise ConfigError("%s must not be empty" % name)
            if "\x00" in text:
                raise ConfigError("%s must not contain a NUL character" % name)
            if kind == "path" and self.absolute and not os.path.isabs(text):
                raise ConfigError("%s must be an absolute path, got %s" % (name, _shown(text)))
            return text
        if kind == "list":
            items = value
            if isinstance(value, str):
                if self.split:
                    parts = value.split() if self.split == " " else value.split(self.split)
                    items = [part.strip() for part in parts if part.strip()]
                else:
                    items = [value]
            if not isinstance(items, (list, tuple)):
                raise ConfigError("%s must be a list of strings, got %s" % (name, _shown(value)))
            for item in items:
                if not isinstance(item, str):
                    raise ConfigError("%s must be a list of strings; %s is not a string" % (name, _shown(item)))
            return list(items)
        if kind == "dict":
            if not isinstance(value, dict):
                raise ConfigError("%s must be a mapping, got %s" % (name, _shown(value)))
            return dict(value)
        return value


class Schema:
    """The fields of one dict option, e.g. ``Schema("postgres target", {...})``."""

    def __init__(self, name, fields):
        self.name = name
        self.fields = dict(fields)

    def extend(self, name, fields):
        """A new schema with this one's fields plus ``fields``."""
        merged = dict(self.fields)
        merged.update(fields)
        return Schema(name, merged)

    def spellings(self):
        """Every accepted key: each field, plus ``_file``/``_env`` of secret fields."""
        keys = []
        for key, field in self.fields.items():
            keys.append(key)
            if field.secret:
                keys.extend(key + suffix for suffix in SECRET_SUFFIXES)
        return keys

    def validate(self, options, where=None):
        """A copy of ``options`` with every value of its declared type.

        ``None`` values count as not given (Ansible fills unset sub-options with None) and are
        dropped. Unknown keys, wrong types and values out of bounds raise ConfigError naming
        ``<where>.<field>`` and the value. Nothing else is read: secrets given as ``_file`` or
        ``_env`` are resolved later by ``config.resolve_secret_refs``.
        """
        where = where or self.name
        if options is None:
            return {}
        if not isinstance(options, dict):
            raise ConfigError("%s must be a mapping of options, got %s" % (where, type(options).__name__))
        allowed = self.spellings()
        unknown = sorted(str(key) for key in options if key not in allowed)
        if unknown:
            raise ConfigError("%s: unknown option(s) %s (known: %s)" % (where, ", ".join(unknown), ", ".join(allowed)))
        checked = {}
        for key, value in options.items():
            if value is None:
                continue
            name = "%s.%s" % (where, key)
            field = self.fields.get(key)
            if field is None:  # a secret's _file / _env spelling
                if key.endswith("_env"):
                    if not isinstance(value, str) or not _ENV_NAME.match(value):
                        raise ConfigError("%s must name an environment variable, got %s" % (name, _shown(value)))
                elif not isinstance(value, str) or not value.strip():
                    raise ConfigError("%s must be the path of a file, got %s" % (name, _shown(value)))
                checked[key] = value
                continue
            if field.secret and not isinstance(value, str):
                raise ConfigError("%s must be a string" % name)  # the value itself is never shown
            checked[key] = field.parse(value, name)
        return checked

    def describe(self):
        """``{field: {type, description, choices?, minimum?, maximum?, secret?}}`` for docs and tests."""
        described = {}
        for key, field in self.fields.items():
            entry = {"type": field.type, "description": field.description}
            for attr in ("choices", "minimum", "maximum", "exclusive_minimum"):
                if getattr(field, attr) is not None:
                    entry[attr] = getattr(field, attr)
            if field.secret:
                entry["secret"] = True
            described[key] = entry
        return described
