r"""Evaluation tasks of your own, described by a small YAML file instead of code.

A task file names a data file (JSON, JSONL or parquet, one record per question), says whether
the model picks among choices or writes an answer, and gives templates that turn each record
into a question. Templates are Python format strings over the record's fields: "{country}" is
the field `country`, "{options[0]}" the first element of the list `options`, "{meta[id]}" a
key of the object `meta`; write a literal brace as "{{" or "}}".

A multiple-choice task, scored by log-likelihood like the standard benchmarks (eval/formats.py):

    # capitals.yaml
    name: capitals
    data: capitals.jsonl        # relative to this YAML file
    kind: multiple_choice
    prompt: "Q: What is the capital of {country}?\nA:"
    choices: "{options}"        # a field holding the list of choices ...
    # choices: ["{city1}", "{city2}", "{city3}"]   # ... or one template per choice
    answer: "{label}"           # the right choice: its 0-based index or its text
    few_shot: 1                 # solved examples placed before each question (default 0)

    # capitals.jsonl
    {"country": "France", "options": ["Lyon", "Paris", "Nice"], "label": 1}
    {"country": "Japan", "options": ["Tokyo", "Osaka", "Kyoto"], "label": "Tokyo"}

Each choice is scored as a continuation of the prompt, after a space (" Paris"), as
lm-evaluation-harness does; no space is added when the prompt already ends in whitespace or
the choice starts with it. When `answer` is just one field ("{label}"), that field's value
is used as it is: an integer is a 0-based index, a string is the text of the right choice
or, when no choice has that text, a 0-based index written in digits. A longer template is
filled in first, then read as such a string.

A generation task, where the model writes its answer and a checker compares it with the
reference:

    name: arithmetic
    data: sums.jsonl
    kind: generate
    prompt: "Question: What is {a} plus {b}?\nAnswer:"
    answer: "{total}"           # the reference answer
    metric: regex               # exact_match (default): the whole reply, trimmed, whitespace collapsed
    regex: "(-?\\d+)"           # with metric regex: group 1 of the first match is the model's answer
    stop: ["\n"]                # generation ends at any of these (default ["\n\n"])
    max_new_tokens: 16          # default 32
    few_shot: 3

Keys: name, data, kind, prompt, answer are required; choices is required for (and only for)
multiple_choice; metric, regex, stop and max_new_tokens are only for generate. A mistake (an
unknown key, a missing one, a bad value, a template field a record lacks) stops the load with
a message naming the YAML file and the key, or the data file and line.

    task = load_custom_task("capitals.yaml")
    task.items[0].options[1]      # ("Q: What is the capital of France?\nA:", " Paris")
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from binarylm.errors import BinaryLMError
from binarylm.eval.formats import read_rows
from binarylm.eval.items import ChoiceItem, GenerationItem

MULTIPLE_CHOICE = "multiple_choice"
GENERATE = "generate"
KINDS = (MULTIPLE_CHOICE, GENERATE)
METRICS = ("exact_match", "regex")
REQUIRED_KEYS = ("name", "data", "kind", "prompt", "answer")
KIND_ONLY_KEYS = {MULTIPLE_CHOICE: ("choices",), GENERATE: ("metric", "regex", "stop", "max_new_tokens")}
VALID_KEYS = REQUIRED_KEYS + ("choices", "few_shot", "metric", "regex", "stop", "max_new_tokens")
DEFAULT_STOP = ("\n\n",)
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class CustomTask:
    """A task loaded from YAML: its items, ready for the evaluators, and how to run and score them."""

    name: str
    kind: str  # "multiple_choice" or "generate"
    items: tuple[ChoiceItem, ...] | tuple[GenerationItem, ...]
    few_shot: int  # solved examples before each question, by default
    metric: str | None  # generate: "exact_match" or "regex"; None for multiple choice
    regex: str | None  # with metric "regex": group 1 of its first match in the reply is the model's answer
    max_new_tokens: int | None  # generate only
    path: Path  # the YAML file


def load_custom_task(path: str | Path) -> CustomTask:
    """The task described by the YAML file at `path` (schema in this module's docstring)."""
    path = Path(path)
    spec = _TaskSpec(path, _read_yaml(path))
    spec.check_known_keys()
    kind = spec.one_of("kind", KINDS)
    spec.check_keys_for(kind)
    name, prompt, answer = spec.text("name"), spec.template("prompt"), spec.template("answer")
    few_shot = spec.count("few_shot", default=0, least=0)
    if kind == MULTIPLE_CHOICE:  # every setting is checked before the data is read
        choices = spec.choices_template()
        metric = regex = max_new_tokens = None

        def make_item(where: str, row: dict) -> ChoiceItem | GenerationItem:
            return _choice_item(spec, where, row, prompt, choices, answer)
    else:
        metric = spec.one_of("metric", METRICS, default="exact_match")
        regex = spec.regex(metric)
        stop = spec.stop_strings()
        max_new_tokens = spec.count("max_new_tokens", default=DEFAULT_MAX_NEW_TOKENS, least=1)

        def make_item(where: str, row: dict) -> ChoiceItem | GenerationItem:
            return _generation_item(spec, where, row, prompt, answer, stop)
    items = tuple(make_item(where, row) for where, row in read_rows(spec.data_path(), f"'{name}' task"))
    if few_shot >= len(items):
        raise spec.error("few_shot", f"is {few_shot}, but the data has only {len(items)} records; "
                                     f"each question needs {few_shot} others as solved examples")
    return CustomTask(name, kind, items, few_shot, metric, regex, max_new_tokens, path)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise BinaryLMError(f"{path} is not a file; give a YAML task file (its schema: binarylm/eval/custom.py)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise BinaryLMError(f"{place}: malformed YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(spec, dict):
        raise BinaryLMError(f"{path}: a task file is a YAML mapping of keys ({', '.join(REQUIRED_KEYS)}, ...), "
                            f"got {type(spec).__name__}")
    return spec


# ---------------------------------------------------------------------------------------------
# The YAML file's keys, checked one by one


class _TaskSpec:
    """The YAML mapping, with typed getters whose errors name the file and the key."""

    def __init__(self, path: Path, spec: dict) -> None:
        self.path = path
        self.spec = spec

    def error(self, key: str, problem: str) -> BinaryLMError:
        return BinaryLMError(f"{self.path}: '{key}' {problem}")

    def check_known_keys(self) -> None:
        for key in self.spec:
            if key not in VALID_KEYS:
                raise BinaryLMError(f"{self.path}: unknown key '{key}'; the valid keys are {', '.join(VALID_KEYS)}")

    def check_keys_for(self, kind: str) -> None:
        required = REQUIRED_KEYS + (("choices",) if kind == MULTIPLE_CHOICE else ())
        for key in required:
            if key not in self.spec:
                raise BinaryLMError(f"{self.path}: missing required key '{key}'; a {kind} task needs "
                                    f"{', '.join(required)}")
        other = GENERATE if kind == MULTIPLE_CHOICE else MULTIPLE_CHOICE
        for key in KIND_ONLY_KEYS[other]:
            if key in self.spec:
                raise self.error(key, f"is only for kind: {other}, and this task is kind: {kind}")

    def value(self, key: str, types: type | tuple[type, ...], expected: str, default: object = None) -> object:
        if key not in self.spec:
            if default is None:
                raise BinaryLMError(f"{self.path}: missing required key '{key}'; the required keys are "
                                    f"{', '.join(REQUIRED_KEYS)}")
            return default
        value = self.spec[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise self.error(key, f"should be {expected}, got {type(value).__name__} {value!r}")
        return value

    def text(self, key: str) -> str:
        value = self.value(key, str, "a string")
        if not value.strip():
            raise self.error(key, "is empty")
        return value

    def count(self, key: str, default: int, least: int) -> int:
        value = self.value(key, int, f"a whole number, at least {least}", default)
        if value < least:
            raise self.error(key, f"is {value}; it should be at least {least}")
        return value

    def one_of(self, key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
        value = self.value(key, str, f"one of {', '.join(allowed)}", default)
        if value not in allowed:
            raise self.error(key, f"is {value!r}; it should be one of {', '.join(allowed)}")
        return value

    def template(self, key: str, value: object = None) -> str:
        """A format string over record fields, checked for well-formed braces and named fields."""
        value = self.text(key) if value is None else value
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
        except ValueError as error:
            raise self.error(key, f"is not a valid template ({error}); write literal braces as {{{{ and }}}}") from None
        for field in fields:
            if not field or field[0].isdigit():
                raise self.error(key, f"uses a positional field '{{{field}}}'; "
                                      f"name a record field instead, like '{{question}}'")
        return value

    def choices_template(self) -> str | tuple[str, ...]:
        value = self.value("choices", (str, list), "a field in braces holding a list, like '{options}', "
                                                   "or a list of templates, one per choice")
        if isinstance(value, str):
            if _bare_field(value) is None:
                raise self.error("choices", f"is {value!r}; as a string it must be one field in braces holding "
                                            f"a list, like '{{options}}', or else give a list of templates")
            return value
        if len(value) < 2 or not all(isinstance(choice, str) for choice in value):
            raise self.error("choices", "as a list should hold at least two templates, one string per choice")
        return tuple(self.template("choices", choice) for choice in value)

    def regex(self, metric: str) -> str | None:
        if metric != "regex":
            if "regex" in self.spec:
                raise self.error("regex", f"is used only with metric: regex, and this task has metric: {metric}")
            return None
        pattern = self.text("regex")
        try:
            groups = re.compile(pattern).groups
        except re.error as error:
            raise self.error("regex", f"does not compile: {error}") from None
        if groups < 1:
            raise self.error("regex", f"{pattern!r} has no group; put the answer in parentheses, like 'is (-?\\d+)'")
        return pattern

    def stop_strings(self) -> tuple[str, ...]:
        value = self.value("stop", (str, list), "a string or a list of strings", list(DEFAULT_STOP))
        stops = [value] if isinstance(value, str) else value
        if not stops or not all(isinstance(stop, str) and stop for stop in stops):
            raise self.error("stop", "should hold one or more non-empty strings")
        return tuple(stops)

    def data_path(self) -> Path:
        data = self.text("data")
        resolved = self.path.parent / Path(data).expanduser()
        if not resolved.is_file():
            raise self.error("data", f"names {data!r}, which is not a file (looked for {resolved}; "
                                     f"a relative path is taken from the YAML file's folder)")
        return resolved


def _bare_field(template: str) -> str | None:
    """The field name when `template` is exactly one field in braces ("{label}"), else None."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return None
    if len(parts) != 1:
        return None
    literal, field, spec, conversion = parts[0]
    return field if field and not literal and not spec and conversion is None else None


# ---------------------------------------------------------------------------------------------
# Records into items


def _choice_item(spec: _TaskSpec, where: str, row: dict, prompt: str, choices: str | tuple[str, ...],
                 answer: str) -> ChoiceItem:
    context = _fill(spec, "prompt", prompt, where, row)
    texts = _choice_texts(spec, where, row, choices)
    gold = _gold_index(spec, where, row, answer, texts)
    options = tuple((context, _continuation(context, text)) for text in texts)
    return ChoiceItem(where, options, gold, few_shot_text=context + options[gold][1])


def _generation_item(spec: _TaskSpec, where: str, row: dict, prompt: str, answer: str,
                     stop: tuple[str, ...]) -> GenerationItem:
    question = _fill(spec, "prompt", prompt, where, row)
    reference = _fill(spec, "answer", answer, where, row)
    return GenerationItem(where, question, reference, stop=stop,
                          few_shot_text=question + _continuation(question, reference))


def _continuation(context: str, text: str) -> str:
    """`text` as a continuation of `context`: after a space, unless whitespace already separates them."""
    return text if context[-1:].isspace() or text[:1].isspace() else " " + text


def _choice_texts(spec: _TaskSpec, where: str, row: dict, choices: str | tuple[str, ...]) -> list[str]:
    if isinstance(choices, tuple):
        return [_fill(spec, "choices", template, where, row) for template in choices]
    value = _lookup(spec, "choices", choices, where, row)
    if not isinstance(value, list) or len(value) < 2:
        raise BinaryLMError(f"{where}: {choices} (the 'choices' of {spec.path}) should be a list of at least "
                            f"two choices, got {type(value).__name__} {value!r}")
    if not all(isinstance(choice, str | int | float) and not isinstance(choice, bool) for choice in value):
        raise BinaryLMError(f"{where}: {choices} (the 'choices' of {spec.path}) should hold strings or numbers, "
                            f"got {value!r}")
    return [str(choice) for choice in value]


def _gold_index(spec: _TaskSpec, where: str, row: dict, answer: str, texts: list[str]) -> int:
    """The right choice: an integer is a 0-based index; a string is a choice's text, or else an index in digits."""
    if _bare_field(answer):
        value = _lookup(spec, "answer", answer, where, row)
    else:
        value = _fill(spec, "answer", answer, where, row)
    if isinstance(value, str) and value in texts:
        return texts.index(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(texts):
        return value
    raise BinaryLMError(f"{where}: the answer {value!r} (from 'answer: {answer}' in {spec.path}) is neither one of "
                        f"the choices {texts} nor a 0-based index below {len(texts)}")


def _fill(spec: _TaskSpec, key: str, template: str, where: str, row: dict) -> str:
    """`template` filled in from `row`, or an error naming the data row, the YAML key and the missing field."""
    try:
        return template.format_map(row)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        raise _field_error(spec, key, template, where, row, error) from None


def _lookup(spec: _TaskSpec, key: str, template: str, where: str, row: dict) -> object:
    """The raw value (not its text) of the one field in `template`, like "{options}"."""
    try:
        return string.Formatter().get_field(_bare_field(template), (), row)[0]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        raise _field_error(spec, key, template, where, row, error) from None


def _field_error(spec: _TaskSpec, key: str, template: str, where: str, row: dict, error: Exception) -> BinaryLMError:
    if isinstance(error, KeyError):
        problem = f"has no field {error.args[0]!r}"
    else:
        problem = f"does not fit ({type(error).__name__}: {error})"
    return BinaryLMError(f"{where}: this record {problem}, which '{key}: {template}' in {spec.path} uses; "
                         f"the record's fields are {', '.join(map(str, row)) or 'none'}")
